"""A credited data connection's answers (`CreditedAnswers`), without a network: an answer goes out
only against a credit, in order, from the reader when it can and from the writer otherwise."""

from __future__ import annotations

import threading

from flexemr.embedding_server.server import CreditedAnswers


def answer(n: int) -> list[memoryview]:
    return [memoryview(bytes([n] * 4))]


def taken(answers: CreditedAnswers) -> int:
    """The first byte of the writer's next answer."""
    views = answers.take()
    assert views is not None
    return int(views[0][0])


def test_without_credit_an_answer_is_held_until_one_is_granted() -> None:
    answers = CreditedAnswers(0, max_bytes=1 << 20)
    assert answers.put(answer(1)) is False  # held: no credit
    sent: list[int] = []
    writer = threading.Thread(target=lambda: sent.append(taken(answers)))
    writer.start()
    writer.join(0.2)
    assert writer.is_alive() and not sent  # the writer waits for a credit
    answers.grant(1)
    writer.join(5)
    assert sent == [1]
    answers.sent_one()
    assert (answers.sent, answers.granted, answers.waits) == (1, 1, 1)
    answers.close()


def test_the_reader_sends_itself_only_with_a_credit_nothing_held_and_no_send_under_way() -> None:
    answers = CreditedAnswers(3, max_bytes=1 << 20)
    assert answers.put(answer(1)) is True  # the caller's to send now
    assert answers.put(answer(2)) is False  # a send is under way: held, to keep the order
    answers.sent_one()
    assert answers.put(answer(3)) is False  # answer 2 is held: answer 3 goes after it
    assert taken(answers) == 2
    answers.sent_one()
    assert taken(answers) == 3
    answers.sent_one()
    assert answers.put(answer(4)) is False  # no credit left: held
    assert (answers.sent, answers.granted) == (3, 3)
    answers.close()
    assert answers.put(answer(5)) is None and answers.take() is None


def test_held_answers_are_bounded_in_bytes_and_put_waits_for_room() -> None:
    answers = CreditedAnswers(0, max_bytes=6)
    assert answers.put(answer(1)) is False  # 4 bytes held
    done = threading.Event()

    def read() -> None:
        answers.put(answer(2))
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert not done.wait(0.2)  # 4 + 4 > 6: the reader waits (and stops reading its socket)
    answers.grant(1)
    assert taken(answers) == 1
    answers.sent_one()
    assert done.wait(5)
    reader.join(5)
    answers.close()
