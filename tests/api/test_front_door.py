"""The front door without a network: admission, turns, deadlines, versions and error kinds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from flexemr.api.front_door import ErrorKind, FrontDoor, Rejected, classify
from flexemr.api.kserve import InferRequest
from flexemr.batch import InvalidRequest
from flexemr.config import Endpoint, RankerConfig
from flexemr.config.model import ModelSource
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.roles import build_ranker
from flexemr.model.source import load_weights, model_spec
from flexemr.model.weights import build_monolithic
from flexemr.ranker.admission import Dropped, Refused
from flexemr.ranker.model_versions import ModelVersionConflict, ModelVersions, UnknownModelVersion
from flexemr.ranker.ranker import Ranker
from flexemr.sharding.plan import make_plan
from flexemr.transport.base import LookupFailed, NoReplica, ServerUnavailable
from flexemr.transport.local import LocalTransport
from tests.core.helpers import random_batch, reference_scores

SOURCE = ModelSource(preset="tiny", seed=3)
SPEC = model_spec(SOURCE)


def local_ranker(source: ModelSource, config: RankerConfig) -> Ranker:
    plan = make_plan("row", SPEC.table_rows, SPEC.dim, 2)
    spec = ClusterSpec(source, plan, (Endpoint(), Endpoint()), ranker=config)
    return build_ranker(spec, transport=LocalTransport(plan, load_weights(source)))


@pytest.fixture
def door() -> Iterator[FrontDoor]:
    config = RankerConfig(max_batch=64, max_in_flight_samples=64, deadline_s=5.0)

    def loader(source: ModelSource) -> tuple[Ranker, object, None]:
        return local_ranker(source, config), lambda: None, None

    models = ModelVersions(local_ranker(SOURCE, config), SOURCE, loader)  # type: ignore[arg-type]
    yield FrontDoor(models, config)
    models.close()


def request(batch: int, seed: int) -> InferRequest:
    dense, indices, lengths = random_batch(SPEC, batch, seed=seed)
    tensors = {"dense_features": dense, "sparse_indices": indices, "sparse_lengths": lengths}
    return InferRequest("r", tensors, binary_output=True)


def test_scores_are_the_monolithic_models_on_the_version_asked_for(door: FrontDoor) -> None:
    parsed = request(8, seed=1)
    first = reference_scores(build_monolithic(load_weights(SOURCE)), *parsed.tensors.values())
    door.models.load(ModelSource(preset="tiny", seed=4))
    second = reference_scores(
        build_monolithic(load_weights(ModelSource(preset="tiny", seed=4))), *parsed.tensors.values()
    )
    for version, expected in (("1", first), ("", second), ("2", second)):
        with door.request() as ticket:
            scored = door.score(ticket, version, lambda: parsed)
        np.testing.assert_allclose(scored.scores, expected, atol=1e-5)
        assert scored.version == (version or "2") and scored.request is parsed
    with door.request() as ticket, pytest.raises(UnknownModelVersion):
        door.score(ticket, "7", lambda: parsed)


def test_one_admission_bound_for_every_version_and_places_are_freed(door: FrontDoor) -> None:
    door.models.load(ModelSource(preset="tiny", seed=4))
    with door.request() as ticket:
        door.score(ticket, "1", lambda: request(60, seed=2))
        assert door.admission.samples == 60
        with door.request() as other, pytest.raises(Refused):  # 60 + 8 > 64, across versions
            door.score(other, "2", lambda: request(8, seed=3))
    assert door.admission.stats()["samples_in_flight"] == 0
    assert door.admission.stats()["requests_being_read"] == 0
    assert door.stats()["admission"]["refused_requests"] == 1


def test_decoding_and_scoring_run_in_one_turn(door: FrontDoor) -> None:
    held: list[bool] = []

    def decode() -> InferRequest:
        held.append(door.turns._holds())
        return request(4, seed=5)

    with door.request() as ticket:
        door.score(ticket, "", decode)
    assert held == [True] and not door.turns._holds()
    assert door.turns is door.models.ranker.turns  # the ranker gives up the same turn while it waits


def test_work_whose_deadline_passed_is_dropped_and_counted(door: FrontDoor) -> None:
    decoded = threading.Event()

    def decode() -> InferRequest:
        decoded.set()
        return request(4, seed=6)

    with door.request(timeout_s=0.05) as ticket:
        time.sleep(0.1)
        with pytest.raises(Dropped) as caught:
            door.score(ticket, "", decode)
    failure = door.failure(caught.value)
    assert failure.kind is ErrorKind.DEADLINE and "nothing was computed" in failure.message
    assert not decoded.is_set() and door.admission.stats()["dropped_deadline_requests"] == 1


def test_a_full_door_refuses_at_once_before_reading_the_body() -> None:
    config = RankerConfig(max_batch=1, max_in_flight_samples=1)
    models = ModelVersions(local_ranker(SOURCE, config))
    door = FrontDoor(models, config)
    try:
        with door.request() as first:
            door.score(first, "", lambda: request(1, seed=7))  # its sample is held until released
            with pytest.raises(Refused), door.request():
                pass
        with door.request():  # free again
            pass
    finally:
        models.close()


def test_check_model_names_what_is_served(door: FrontDoor) -> None:
    door.check_model(door.model_name, "1")
    with pytest.raises(Rejected, match="unknown model 'other'") as caught:
        door.check_model("other")
    assert caught.value.kind is ErrorKind.UNKNOWN_MODEL
    with pytest.raises(Rejected, match=r"has versions \['1'\], not '2'"):
        door.check_model(door.model_name, "2")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (InvalidRequest("x"), ErrorKind.INVALID_INPUT),
        (UnknownModelVersion("x"), ErrorKind.UNKNOWN_MODEL),
        (ModelVersionConflict("x"), ErrorKind.CONFLICT),
        (Refused("x"), ErrorKind.REFUSED),
        (Dropped("deadline", "x"), ErrorKind.DEADLINE),
        (Dropped("disconnected", "x"), ErrorKind.DISCONNECTED),
        (ServerUnavailable(0, "a", "x"), ErrorKind.SERVER_UNAVAILABLE),
        (NoReplica([0], "x"), ErrorKind.SERVER_UNAVAILABLE),
        (LookupFailed("x"), ErrorKind.LOOKUP_FAILED),
        (Rejected(ErrorKind.TOO_LARGE, "x"), ErrorKind.TOO_LARGE),
        (ValueError("x"), ErrorKind.INTERNAL),
        (RuntimeError("x"), ErrorKind.INTERNAL),
    ],
)
def test_classify(exc: Exception, kind: ErrorKind) -> None:
    assert classify(exc) is kind


def test_internal_failures_are_logged_and_not_shown(
    door: FrontDoor, caplog: pytest.LogCaptureFixture
) -> None:
    failure = door.failure(RuntimeError("secret detail"))
    assert failure.kind is ErrorKind.INTERNAL and "secret detail" not in failure.message
    assert "secret detail" in caplog.text
