"""The gate a request waits on for its subrequests' answers: open once every answer is in, or at
the first failure, and open from then on."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from flexemr.ranker.ranker import _AllAnswers

NO_SUB: Any = None
"""The subrequest beside each future (the gate reads only the futures)."""


def _waiting(answers: _AllAnswers) -> threading.Thread:
    waiter = threading.Thread(target=answers.wait, args=(60.0,), daemon=True)
    waiter.start()
    return waiter


def _watched(n: int) -> tuple[_AllAnswers, list[Future[np.ndarray]]]:
    answers = _AllAnswers()
    futures: list[Future[np.ndarray]] = [Future() for _ in range(n)]
    sent: list[tuple[Any, Future[np.ndarray]]] = [(NO_SUB, f) for f in futures]
    assert answers.watch(sent) is sent
    return answers, futures


def test_opens_once_every_answer_is_in_and_stays_open() -> None:
    answers, futures = _watched(3)
    waiter = _waiting(answers)
    futures[0].set_result(np.zeros(1))
    futures[2].set_result(np.zeros(1))
    waiter.join(0.2)
    assert waiter.is_alive()  # one answer still out
    futures[1].set_result(np.zeros(1))
    waiter.join(10)
    assert not waiter.is_alive()
    again = _waiting(answers)  # open from then on, even for answers watched later
    answers.watch([(NO_SUB, Future())])
    again.join(10)
    assert not again.is_alive()


def test_opens_at_the_first_failure_with_answers_still_out() -> None:
    answers, futures = _watched(2)
    waiter = _waiting(answers)
    futures[1].set_exception(ConnectionError("server gone"))
    waiter.join(10)
    assert not waiter.is_alive() and not futures[0].done()


def test_answers_in_before_watching_count_and_a_wait_times_out_while_closed() -> None:
    answers = _AllAnswers()
    done: Future[np.ndarray] = Future()
    done.set_result(np.zeros(1))
    answers.watch([(NO_SUB, done), (NO_SUB, Future())])
    answers.wait(0.01)  # returns at its timeout: one answer is still out
    waiter = _waiting(answers)
    waiter.join(0.2)
    assert waiter.is_alive()
    answers.watch([])  # watching nothing changes nothing
    waiter.join(0.1)
    assert waiter.is_alive()
    cancelled: Future[np.ndarray] = Future()
    cancelled.cancel()
    answers.watch([(NO_SUB, cancelled)])  # a cancelled subrequest counts as failed: open
    waiter.join(10)
    assert not waiter.is_alive()
