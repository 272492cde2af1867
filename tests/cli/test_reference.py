"""The reference generator reads what the docs need from the code itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flexemr import config
from flexemr.cli import main, reference


@dataclass(frozen=True)
class Inner:
    """Something nested."""

    depth: int = 3
    """How deep."""


@dataclass(frozen=True)
class Section:
    """A section of a spec."""

    mode: Literal["on", "off"] = field(default="on", metadata=config.flag("--mode", "the mode's flag help"))
    limit_bytes: int = 64 * 2**20
    """Bytes held at most."""
    inner: Inner = field(default_factory=Inner)
    items: tuple[Inner, ...] = ()


def test_a_section_has_each_field_with_its_type_default_flag_and_docstring() -> None:
    text = "\n".join(reference._section(Section, "section", listed=False))
    assert "`Section`: A section of a spec." in text
    assert '| `mode` | "on" \\| "off" | `"on"` | `--mode` | the mode\'s flag help |' in text
    assert "| `limit_bytes` | int | `67108864` (64.0MiB) |  | Bytes held at most. |" in text
    assert "## `section.inner`" in text and "| `depth` | int | `3` |  | How deep. |" in text
    assert "## `section.items`" in text and "A list: each item has these fields (`Inner`)." in text


def test_the_config_page_has_every_section_of_a_spec_file() -> None:
    page = reference.config_page()
    for section in ("ranker", "engine", "security", "limits", "storage", "updates", "cache", "frames"):
        assert f"## `{section}`" in page
    assert "`--io-threads`" in page and "`--deadline-ms`" in page


def test_the_cli_page_has_every_command_and_flag() -> None:
    page = reference.cli_page()
    for name in main.COMMANDS:
        assert f"## flexemr {name}" in page
    serve = page.split("## flexemr serve")[1].split("\n## ")[0]
    assert "`--grpc-port`" in serve and "`--replicas`" in serve and "`--help`" not in serve


def test_check_reports_a_stale_page_and_writing_makes_it_fresh(tmp_path: Path) -> None:
    (tmp_path / "config.md").write_text("old")
    assert reference.entry(["--check", "--out", str(tmp_path)]) == 1
    assert (tmp_path / "config.md").read_text() == "old"
    assert reference.entry(["--out", str(tmp_path)]) == 0
    assert reference.entry(["--check", "--out", str(tmp_path)]) == 0
