"""common/tasks.py Backoff: the one exponential retry every loop and client uses."""

from __future__ import annotations

from common.tasks import Backoff
from peer.sched_session import RETRY_MAX, RETRY_MIN, retry_backoff


def test_doubles_per_failure_in_a_row_up_to_most() -> None:
    b = Backoff(first=0.2, most=2.0)
    assert [b.delay() for _ in range(6)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]


def test_a_success_starts_the_doubling_over() -> None:
    b = Backoff(first=0.2, most=2.0)
    b.delay()
    b.delay()
    b.reset()
    assert b.delay() == 0.2


def test_a_healthy_run_starts_the_doubling_over() -> None:
    b = Backoff(first=0.1, most=5.0, healthy=30.0)
    assert [b.delay(1.0) for _ in range(3)] == [0.1, 0.2, 0.4]
    assert b.delay(30.0) == 0.1


def test_the_scheduler_retries_back_off_between_their_bounds() -> None:
    b = retry_backoff()
    assert b.delay() == RETRY_MIN
    assert max(b.delay() for _ in range(10)) == RETRY_MAX
