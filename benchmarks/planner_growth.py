"""Growth scenario: re-plan yearly as tables double and MLPs grow 1.5x; plot $/hour per design.

.venv/bin/python benchmarks/planner_growth.py [--preset dlrm-v2] [--qps 1000] [--p99-ms 50]
    [--calibration calibration.json] [--out reports/planner_growth.png]

A year where a design cannot meet the target prints why (the planner's own reason) and has no point
on the plot; if no design is feasible in any year the script exits 1 and says what to change.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

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
    parser.add_argument("--preset", choices=PRESET_NAMES, default="dlrm-v2")
    parser.add_argument("--qps", type=float, default=1000)
    parser.add_argument("--p99-ms", type=float, default=50)
    parser.add_argument("--availability", type=int, default=1)
    parser.add_argument("--ranker-spares", type=int, default=1)
    parser.add_argument(
        "--calibration", help="file from `flexemr calibrate` (default: uncalibrated constants)"
    )
    parser.add_argument("--out", default="reports/planner_growth.png")
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
        outcomes: dict[str, float | str] = {}
        try:
            outcomes["disaggregated"] = search_disaggregated(request, catalog, calibration).cost_per_hour
        except PlanningError as exc:
            outcomes["disaggregated"] = " ".join(line.strip() for line in str(exc).splitlines())
        for name, alt in (
            ("scale-up", scale_up(request, catalog, calibration)),
            ("scale-out", scale_out(request, catalog, calibration)),
        ):
            outcomes[name] = alt if isinstance(alt, str) else alt.cost_per_hour
        print(f"year {year}: {model.embedding_bytes / 2**30:.1f} GiB of tables")
        for name, outcome in outcomes.items():
            if isinstance(outcome, str):
                costs[name].append(math.nan)
                print(f"  {name}: infeasible: {outcome}")
            else:
                costs[name].append(outcome)
                print(f"  {name}: ${outcome:.2f}/h")
    if all(math.isnan(c) for values in costs.values() for c in values):
        print(
            f"no design meets p99 <= {args.p99_ms:g} ms at {args.qps:g} QPS in any year: raise --p99-ms, "
            "lower --qps or pass --calibration (the uncalibrated constants are conservative)",
            file=sys.stderr,
        )
        sys.exit(1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in costs.items():
        missing = sum(math.isnan(v) for v in values)
        ax.plot(
            years, values, marker="o", label=name + (f" (infeasible in {missing} years)" if missing else "")
        )
    ax.set_xlabel("year (tables x2, MLPs x1.5 per year)")
    ax.set_ylabel("$ per hour")
    ax.set_title(f"{args.preset} at {args.qps:g} QPS, p99 <= {args.p99_ms:g} ms ({calibration.label[:12]})")
    ax.set_xticks(years)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
