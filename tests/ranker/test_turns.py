"""The ranker's request threads take turns: one computes at a time, waits let others in."""

from __future__ import annotations

import threading
import time

from flexemr.ranker.turns import InterpreterTurns


def test_one_thread_computes_at_a_time() -> None:
    turns = InterpreterTurns()
    inside, most = 0, 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(200):
            with turns.turn():
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0)  # invite a switch while holding the turn
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1


def test_waiting_gives_the_turn_to_another_thread() -> None:
    turns = InterpreterTurns()
    answered = threading.Event()
    served = []

    def server() -> None:
        with turns.turn():  # only gets in while the first thread waits
            served.append("server")
            answered.set()

    with turns.turn():
        helper = threading.Thread(target=server)
        helper.start()
        with turns.waiting():
            assert answered.wait(10), "the turn was not given up while waiting"
        served.append("back")
    helper.join(10)
    assert served == ["server", "back"]


def gets_a_turn(turns: InterpreterTurns, within_s: float) -> bool:
    """Whether another thread gets a turn within `within_s` (it then gives it back at once)."""
    got = threading.Event()

    def other() -> None:
        with turns.turn():
            got.set()

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    return got.wait(within_s)


def test_turns_are_reentrant_and_waiting_without_a_turn_is_harmless() -> None:
    turns = InterpreterTurns()
    with turns.waiting():  # holds nothing: nothing to give up
        pass
    with turns.turn():
        with turns.turn():
            pass
        # still held after the inner turn: another thread cannot get in
        assert not gets_a_turn(turns, 0.05)
    assert gets_a_turn(turns, 10)


def test_the_turn_goes_to_the_waiting_thread_whose_first_turn_began_earliest() -> None:
    """A request back from a wait gets the turn before requests that arrived after it started, in
    whatever order the threads ask."""
    turns = InterpreterTurns()
    order: list[str] = []
    back = threading.Event()

    def old_request() -> None:
        with turns.turn():  # starts first...
            with turns.waiting():  # ...then waits (the dense model) while newer requests queue
                back.wait(30)
            order.append("old")

    def new_request(name: str, queued: threading.Event) -> None:
        queued.set()
        with turns.turn():
            order.append(name)

    with turns.turn():  # the turn is busy while everyone queues
        old = threading.Thread(target=old_request)
        old.start()
        while not turns._waiters:  # the old request is queued for its first turn
            time.sleep(0.001)
    while turns._waiters:  # it got its turn, and is waiting
        time.sleep(0.001)
    with turns.turn():
        newer = []
        for k in range(3):
            queued = threading.Event()
            newer.append(threading.Thread(target=new_request, args=(f"new{k}", queued)))
            newer[-1].start()
            assert queued.wait(30)
            while len(turns._waiters) < k + 1:
                time.sleep(0.001)
        back.set()  # the old request queues last, behind three newer ones
        while len(turns._waiters) < 4:
            time.sleep(0.001)
    for thread in [old, *newer]:
        thread.join(30)
    assert order == ["old", "new0", "new1", "new2"]
