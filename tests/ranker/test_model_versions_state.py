"""`ModelVersions` without processes: who serves, what is closed when, and failed loads."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest

from flexemr.config import RankerConfig
from flexemr.config.model import ModelSource
from flexemr.model.source import model_spec
from flexemr.ranker.model_versions import ModelVersionConflict, ModelVersions, UnknownModelVersion
from flexemr.ranker.ranker import Ranker

SOURCE = ModelSource(preset="tiny", seed=3)


class FakeRanker:
    """What `ModelVersions` uses of a ranker; `fail` makes its warm-up batch fail."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.config = RankerConfig()
        self.spec = model_spec(SOURCE)
        self.fail = fail
        self.closed = False

    def score(self, *args: Any) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot score")

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def versions(first: FakeRanker, made: list[FakeRanker]) -> ModelVersions:
    def loader(source: ModelSource) -> tuple[Ranker, Any, None]:
        ranker = FakeRanker(f"seed{source.seed}", fail=source.seed < 0)
        made.append(ranker)
        return cast(Ranker, ranker), lambda: None, None

    return ModelVersions(cast(Ranker, first), SOURCE, loader, drain_timeout_s=30)


def seed(n: int) -> ModelSource:
    return ModelSource(preset="tiny", seed=n)


def test_unloading_waits_for_the_requests_using_a_version() -> None:
    first, made = FakeRanker("v1"), []
    models = versions(first, made)
    models.load(seed(4))
    with models.use("1") as old:
        assert old.ranker is first
        unloading = threading.Thread(target=models.unload, args=("1",))
        unloading.start()
        time.sleep(0.3)
        assert unloading.is_alive() and not first.closed  # a request still uses it
        with pytest.raises(UnknownModelVersion), models.use("1"):  # but no new request gets it
            pass
    unloading.join(10)
    assert first.closed and models.names() == ["2"]


def test_a_failed_load_changes_nothing_and_at_most_two_versions_are_loaded() -> None:
    first, made = FakeRanker("v1"), []
    models = versions(first, made)
    with pytest.raises(RuntimeError, match="cannot score"):
        models.load(seed(-1))
    assert made[0].closed and models.serving.ranker is first and models.names() == ["1"]
    models.load(seed(4))
    models.load(seed(5))  # the one not serving (1) makes room
    assert first.closed and models.names() == ["2", "3"] and models.serving.name == "3"
    assert models.serve("2").name == "2" and models.rollbacks == 1
    models.load(seed(6))  # numbers are never reused
    assert models.names() == ["2", "4"]
    models.unload()  # the serving one: back to 2
    assert models.names() == ["2"] and models.serving.name == "2"
    with pytest.raises(ModelVersionConflict, match="only one loaded"):
        models.unload()


def test_before_switch_sees_every_switch_first_and_a_failure_stops_it() -> None:
    first, made = FakeRanker("v1"), []
    models = versions(first, made)
    seen: list[tuple[str, str]] = []  # (version about to serve, version serving then)
    models.before_switch = lambda version: seen.append((version.name, models.serving.name))
    models.load(seed(4))
    models.serve("1")
    models.unload("1")  # the serving one: version 2 serves again
    assert seen == [("2", "1"), ("1", "2"), ("2", "1")]

    def refuse(version: Any) -> None:
        raise OSError("disk full")

    models.before_switch = refuse
    with pytest.raises(OSError, match="disk full"):
        models.load(seed(5))
    assert made[-1].closed and models.serving.name == "2" and models.names() == ["2"]
    assert models.loads == 1
