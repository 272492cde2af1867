"""After start-up a serving process hides what it made from the garbage collector, so a full
collection while serving walks only what serving made since."""

from __future__ import annotations

import gc

from flexemr.entrypoints.roles import freeze_start_up_objects


class Made:
    pass


def test_objects_made_at_start_up_are_out_of_the_collectors_sight_and_later_ones_in() -> None:
    at_start_up = Made()
    try:
        freeze_start_up_objects()
        serving = Made()
        tracked = gc.get_objects()
        assert not any(o is at_start_up for o in tracked)
        assert any(o is serving for o in tracked)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
