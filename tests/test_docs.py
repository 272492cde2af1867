"""The docs: the MkDocs site builds with --strict (no broken link or anchor), the generated reference
pages are those the code writes now, and the README stays a short front page inside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from flexemr.cli import reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strict(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about its successor
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "reference" / "config" / "index.html").exists()
    assert not (tmp_path / "_incoming").exists()


def test_the_reference_pages_are_fresh() -> None:
    for name, text in reference.pages().items():
        committed = (ROOT / "docs" / "reference" / name).read_text()
        assert committed == text, f"docs/reference/{name} is stale: run `make reference`"


def test_the_readme_is_a_front_page_that_links_only_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10 * 1024
    for target in re.findall(r"\]\(([^)]+)\)", readme):
        assert "://" not in target and not target.startswith(("/", "..")), target
        assert (ROOT / target.split("#")[0]).exists(), target
