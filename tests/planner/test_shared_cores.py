"""The one-host prediction the validation benchmark compares with real runs on one machine."""

from __future__ import annotations

import dataclasses
import math

import pytest

from flexemr.planner import Deployment, NodeType, Traffic, default_calibration, place, predict
from flexemr.planner.calibration import Calibration, calibration_from_dict
from flexemr.planner.inputs import InputError
from tests.planner.helpers import small_model

LOCAL = NodeType("local", vcpus=2, memory_gib=16, network_gbps=16, price_per_hour=1.0)
TRAFFIC = Traffic(1.0, samples_per_query=32, samples_cv=0.3)


def local(rankers: int, servers: int = 2, in_flight: int = 0) -> Deployment:
    placement = place(small_model(), servers, 1, "row")
    return Deployment(LOCAL, rankers, LOCAL, placement, hosting="one-host", in_flight=in_flight)


def demand_s(dep: Deployment, calibration: Calibration) -> float:
    breakdown = predict(dep, small_model(), TRAFFIC, calibration).breakdown_ms
    return sum(breakdown[k] for k in ("client", "ranker", "lookups")) / 1e3


def test_capacity_is_bounded_by_the_shared_cores_and_each_ranker_process() -> None:
    cal = default_calibration()
    one, two = (predict(local(r, in_flight=4), small_model(), TRAFFIC, cal) for r in (1, 2))
    assert one.bottleneck == "ranker processes"
    assert two.max_qps > one.max_qps
    # The cores stay busy only `ranker_cores` of the time when they saturate, as the ranker does.
    assert two.max_qps <= 2 * cal.serving.ranker_cores / demand_s(local(2, in_flight=4), cal) * (1 + 1e-9)


def test_contention_costs_capacity_only_when_requests_overlap() -> None:
    cal = default_calibration()
    calm = dataclasses.replace(cal, serving=dataclasses.replace(cal.serving, ranker_contention=0.0))

    def capacity(calibration: Calibration, in_flight: int) -> float:
        return predict(local(1, in_flight=in_flight), small_model(), TRAFFIC, calibration).max_qps

    assert capacity(cal, 1) == pytest.approx(capacity(calm, 1))
    assert capacity(cal, 4) < capacity(cal, 2) < capacity(cal, 1)
    assert capacity(calm, 4) == pytest.approx(capacity(calm, 1))


def test_p99_grows_with_load_from_the_demand_to_overload() -> None:
    cal = default_calibration()
    dep = local(2)
    peak = predict(dep, small_model(), TRAFFIC, cal).max_qps
    light, busy = (predict(dep, small_model(), TRAFFIC, cal, qps=f * peak).p99_ms for f in (0.1, 0.8))
    assert demand_s(dep, cal) * 1e3 < light < busy
    assert math.isinf(predict(dep, small_model(), TRAFFIC, cal, qps=1.01 * peak).p99_ms)


def test_one_host_refuses_failures_and_monolithic_modes() -> None:
    with pytest.raises(ValueError, match="one-host"):
        dataclasses.replace(local(2), ranker_failures=1)
    with pytest.raises(ValueError, match="one-host"):
        Deployment(LOCAL, 1, LOCAL, None, hosting="one-host")


def test_serving_costs_round_trip_and_reject_unknown_fields() -> None:
    cal = default_calibration()
    assert calibration_from_dict(cal.to_dict()).serving == cal.serving
    with pytest.raises(InputError, match="serving"):
        calibration_from_dict({"serving": {"ranker_nap_s": 1.0}})
