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


def test_turns_are_reentrant_and_waiting_without_a_turn_is_harmless() -> None:
    turns = InterpreterTurns()
    with turns.waiting():  # holds nothing: nothing to give up
        pass
    with turns.turn():
        with turns.turn():
            pass
        # still held after the inner turn: another thread cannot get in
        got = []
        other = threading.Thread(target=lambda: got.append(turns._lock.acquire(timeout=0.05)))
        other.start()
        other.join()
        assert got == [False]
    assert turns._lock.acquire(timeout=1)
