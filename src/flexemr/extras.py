"""The optional parts of flexemr and the pip extra each comes with: an import of one of them goes
through `needs_extra`, so a missing one says what to install instead of ending in a traceback.

    with needs_extra("ray"):
        import ray
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

EXTRAS: dict[str, tuple[str, ...]] = {
    "ray": ("ray",),
    "grpc": ("grpc", "tritonclient", "google"),
    "parquet": ("pyarrow",),
    "redis": ("redis",),
    "ucx": ("ucxx", "libucxx", "libucx"),
    "bench": ("mlperf_loadgen", "matplotlib", "redis", "grpc", "tritonclient", "google"),
}
"""Each extra of pyproject.toml and the top-level modules it installs."""


class MissingExtra(ImportError):
    """An optional module is not installed; the message names the extra that installs it."""


@contextmanager
def needs_extra(extra: str) -> Iterator[None]:
    """Turn a missing module of `extra` (imported in this block) into `MissingExtra`; any other
    missing module is a bug, and stays a `ModuleNotFoundError`."""
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRAS[extra]:
            raise
        raise MissingExtra(
            f"this needs the Python module {missing!r}, which comes with flexemr's {extra!r} extra: "
            f"pip install 'flexemr[{extra}]'",
            name=exc.name,
        ) from None
