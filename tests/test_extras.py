"""A missing optional part says which extra installs it: each command that needs one, run with that
extra's modules hidden by an import hook, exits 2 with `pip install 'flexemr[EXTRA]'` and no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from flexemr.config import Endpoint
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.extras import EXTRAS, MissingExtra, needs_extra
from flexemr.model.source import model_spec
from flexemr.sharding.plan import make_plan

HIDING = textwrap.dedent(
    """
    import sys

    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    from flexemr.cli.main import main

    sys.exit(main(ARGV))
    """
)


def run_hiding(hidden: tuple[str, ...], argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    code = f"HIDDEN = {set(hidden)!r}\nARGV = {argv!r}\n" + HIDING
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=cwd)


@pytest.mark.parametrize(
    ("extra", "argv"),
    [
        ("ray", ["serve", "--preset", "tiny", "--embedding-servers", "1", "--ray", "local"]),
        (
            "grpc",
            ["serve", "--preset", "tiny", "--embedding-servers", "1", "--port", "0", "--grpc-port", "0"],
        ),
        ("bench", ["bench", "--suite", "quick"]),
        ("redis", ["update", "--redis", "redis://127.0.0.1:1", "--spec", "cluster.json"]),
        ("parquet", ["update", "rows.parquet", "--spec", "cluster.json"]),
    ],
)
def test_a_command_without_its_extra_names_the_extra(extra: str, argv: list[str], tmp_path: Path) -> None:
    source = ModelSource(preset="tiny")
    plan = make_plan("row", model_spec(source).table_rows, model_spec(source).dim, 1)
    ClusterSpec(source, plan, (Endpoint("127.0.0.1", 1),)).save(tmp_path / "cluster.json")
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    done = run_hiding(EXTRAS[extra], argv, tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"pip install 'flexemr[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_another_missing_module_is_not_blamed_on_an_extra() -> None:
    with pytest.raises(ModuleNotFoundError) as caught, needs_extra("ray"):
        import flexemr_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert not isinstance(caught.value, MissingExtra)


def test_every_extra_is_one_of_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert set(EXTRAS) <= set(pyproject["project"]["optional-dependencies"])
