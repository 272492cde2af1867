"""What the planner is asked: the model's shape, the traffic, the latency target, the availability goal.

Each input is a small frozen dataclass validated at construction; the `load_*` functions read them
from JSON files and turn every mistake into an `InputError` that names the file, the field and the
bad value.

    model.json    ModelSpec.to_dict() (with its "row_formats")  or
                  {"preset": "rmc2", "row_scale": 0.1, "row_dtype": "int8"}
    traffic.json  {"peak_qps": 2000, "samples_per_query": 64, "samples_cv": 0.5, "zipf_skew": 1.05}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexemr.config.model import check_format
from flexemr.model.presets import preset
from flexemr.model.rows import row_bytes
from flexemr.model.spec import DEFAULT_ZIPF_SKEW, ModelSpec


class InputError(ValueError):
    """A planner input is missing or malformed; the message says which and how to fix it."""


@dataclass(frozen=True)
class ModelProfile:
    """The numbers the performance model needs from a model."""

    spec: ModelSpec
    """The model's architecture, with how each table's rows are stored (`row_formats`)."""

    @property
    def row_bytes(self) -> int:
        """Bytes of a stored row, averaged over all rows (tables may use different formats)."""
        return -(-self.embedding_bytes // sum(self.spec.table_rows))

    @property
    def table_row_bytes(self) -> tuple[int, ...]:
        """Bytes of one stored row of each table (fp32 4 dim, fp16 2 dim, int8 dim + 8, int4 dim / 2 + 4)."""
        return tuple(row_bytes(fmt, self.spec.dim) for fmt in self.spec.formats)

    @property
    def table_bytes(self) -> tuple[int, ...]:
        return tuple(
            rows * size for rows, size in zip(self.spec.table_rows, self.table_row_bytes, strict=True)
        )

    @property
    def embedding_bytes(self) -> int:
        return sum(self.table_bytes)

    @property
    def lookups_per_sample(self) -> int:
        """Rows read per sample, over all tables (the sum of the pooling factors)."""
        return sum(self.spec.bag_sizes)

    @property
    def dense_flops_per_sample(self) -> float:
        """Multiply-adds x 2 of the bottom MLP, the interaction and the top MLP, for one sample."""
        spec = self.spec
        bottom = sum(a * b for a, b in zip(spec.bottom_mlp[:-1], spec.bottom_mlp[1:], strict=True))
        top_sizes = (spec.interaction_size, *spec.top_mlp)
        top = sum(a * b for a, b in zip(top_sizes[:-1], top_sizes[1:], strict=True))
        vectors = spec.num_tables + 1
        interaction = vectors * vectors * spec.dim if spec.interaction == "dot" else 0
        return 2.0 * (bottom + top + interaction)

    @property
    def dense_param_bytes(self) -> int:
        spec = self.spec
        sizes = [spec.bottom_mlp, (spec.interaction_size, *spec.top_mlp)]
        return 4 * sum((a + 1) * b for mlp in sizes for a, b in zip(mlp[:-1], mlp[1:], strict=True))

    def to_dict(self) -> dict[str, Any]:
        return self.spec.to_dict()


@dataclass(frozen=True)
class Traffic:
    """The load to provision for."""

    peak_qps: float
    """Queries per second at peak; every query is scored as one batch of samples."""
    samples_per_query: float = 64.0
    """Mean candidate items (samples) per query."""
    samples_cv: float = 0.5
    """Coefficient of variation of samples per query (0: every query the same size)."""
    zipf_skew: float = DEFAULT_ZIPF_SKEW
    """Zipf exponent of row popularity (0: uniform). Skew makes lookups cache-friendlier."""

    def __post_init__(self) -> None:
        if not self.peak_qps > 0:
            raise InputError(f"peak_qps must be positive, got {self.peak_qps}")
        if not self.samples_per_query >= 1:
            raise InputError(f"samples_per_query must be at least 1, got {self.samples_per_query}")
        if not 0 <= self.samples_cv <= 10:
            raise InputError(f"samples_cv must be in [0, 10], got {self.samples_cv}")
        if not 0 <= self.zipf_skew <= 3:
            raise InputError(f"zipf_skew must be in [0, 3], got {self.zipf_skew}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Availability:
    """Failures the cluster must ride through while still meeting the target."""

    embedding_server_failures: int = 0
    """k: every row lives on k+1 servers, and k servers down still leave enough capacity."""
    ranker_failures: int = 0
    """j: spare rankers, so j rankers down still leave enough capacity."""

    def __post_init__(self) -> None:
        if not 0 <= self.embedding_server_failures <= 8:
            raise InputError(
                f"embedding-server failures must be in [0, 8], got {self.embedding_server_failures}"
            )
        if not 0 <= self.ranker_failures <= 16:
            raise InputError(f"ranker failures to survive must be in [0, 16], got {self.ranker_failures}")

    @property
    def replicas(self) -> int:
        return self.embedding_server_failures + 1


@dataclass(frozen=True)
class PlanRequest:
    """Everything one planning run needs besides the catalogue and the calibration."""

    model: ModelProfile
    traffic: Traffic
    p99_ms: float
    """Latency target: the 99th percentile of query latency, in milliseconds, at peak QPS."""
    availability: Availability = Availability()
    partial_pooling: bool = True
    """Embedding servers return partial sums (flexemr's default) rather than raw rows."""

    def __post_init__(self) -> None:
        if not self.p99_ms > 0:
            raise InputError(f"the p99 target must be positive, got {self.p99_ms} ms")


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; an `InputError` naming the `what` file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**data)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: {exc}") from None


def model_from_dict(data: dict[str, Any], where: str = "model") -> ModelProfile:
    """A model from a preset reference (`{"preset": ..., "row_scale": ...}`) or a full ModelSpec dict."""
    data = dict(data)
    row_dtype = data.pop("row_dtype", None)
    if "dtype_bytes" in data:  # older model files give bytes per element
        legacy, value = {4: "fp32", 2: "fp16", 1: "int8"}, data.pop("dtype_bytes")
        if value not in legacy:
            raise InputError(f"{where}: dtype_bytes must be 1, 2 or 4, got {value!r}")
        row_dtype = legacy[value]
    try:
        if "preset" in data:
            extra = sorted(set(data) - {"preset", "row_scale"})
            if extra:
                raise InputError(
                    f"a preset model takes only 'preset', 'row_scale' and 'row_dtype', not {extra}"
                )
            spec = preset(str(data["preset"]), float(data.get("row_scale", 1.0)))
        else:
            spec = ModelSpec.from_dict(data)
        if row_dtype is not None:
            spec = spec.with_overrides(row_formats=(check_format(str(row_dtype)),) * spec.num_tables)
        return ModelProfile(spec)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{where}: {exc}") from None


def load_model(path: str | Path) -> ModelProfile:
    return model_from_dict(read_json_object(path, "model"), where=str(path))


def load_traffic(path: str | Path) -> Traffic:
    return _build(Traffic, read_json_object(path, "traffic"), where=str(path))  # type: ignore[no-any-return]
