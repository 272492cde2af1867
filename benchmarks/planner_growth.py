"""Growth scenario: re-plan yearly as tables double and MLPs grow 1.5x; plot $/hour per design.

.venv/bin/python benchmarks/planner_growth.py [--preset rmc2] [--qps 2000] [--p99-ms 40]
    [--calibration calibration.json] [--out growth.png]
"""

from __future__ import annotations

import argparse
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from flexemr.model.presets import PRESET_NAMES, preset
from flexemr.model.spec import ModelSpec
from flexemr.planner import (
    Availability,
    ModelProfile,
    PlanningError,
    PlanRequest,
    Traffic,
    default_calibration,
    load_calibration,
    load_catalog,
    scale_out,
    scale_up,
    search_disaggregated,
)


def grown(spec: ModelSpec, years: int) -> ModelSpec:
    """Tables x2 and hidden MLP widths x1.5 per year (inputs, dim and the output stay)."""

    def widen(sizes: tuple[int, ...], keep_first: bool) -> tuple[int, ...]:
        f = 1.5**years
        return tuple(
            s if (i == 0 and keep_first) or i == len(sizes) - 1 else math.ceil(s * f)
            for i, s in enumerate(sizes)
        )

    return spec.with_overrides(
        table_rows=tuple(r * 2**years for r in spec.table_rows),
        bottom_mlp=widen(spec.bottom_mlp, keep_first=True),
        top_mlp=widen(spec.top_mlp, keep_first=False),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESET_NAMES, default="rmc2")
    parser.add_argument("--qps", type=float, default=2000)
    parser.add_argument("--p99-ms", type=float, default=40)
    parser.add_argument("--availability", type=int, default=1)
    parser.add_argument("--ranker-spares", type=int, default=1)
    parser.add_argument(
        "--calibration", help="file from `flexemr calibrate` (default: uncalibrated constants)"
    )
    parser.add_argument("--out", default="planner_growth.png")
    args = parser.parse_args()
    calibration = load_calibration(args.calibration) if args.calibration else default_calibration()
    catalog = load_catalog()
    years = [0, 1, 2, 3]
    costs: dict[str, list[float]] = {"disaggregated": [], "scale-up": [], "scale-out": []}
    for year in years:
        model = ModelProfile(grown(preset(args.preset), year))
        request = PlanRequest(
            model, Traffic(args.qps), args.p99_ms, Availability(args.availability, args.ranker_spares)
        )
        try:
            costs["disaggregated"].append(search_disaggregated(request, catalog, calibration).cost_per_hour)
        except PlanningError:
            costs["disaggregated"].append(math.nan)
        for name, alt in (
            ("scale-up", scale_up(request, catalog, calibration)),
            ("scale-out", scale_out(request, catalog, calibration)),
        ):
            costs[name].append(math.nan if isinstance(alt, str) else alt.cost_per_hour)
        row = ", ".join(f"{k} ${v[-1]:.2f}/h" for k, v in costs.items())
        print(f"year {year}: {model.embedding_bytes / 2**30:.1f} GiB of tables; {row}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in costs.items():
        ax.plot(years, values, marker="o", label=name)
    ax.set_xlabel("year (tables x2, MLPs x1.5 per year)")
    ax.set_ylabel("$ per hour")
    ax.set_title(f"{args.preset} at {args.qps:g} QPS, p99 <= {args.p99_ms:g} ms ({calibration.label[:12]})")
    ax.set_xticks(years)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
