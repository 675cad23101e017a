"""The acquisition rules (peer/engine/acquire.py), driven directly: events and `now` in, the
next step out, no I/O. The assembled engine is tested through its seams in
test_engine_pull.py."""

from __future__ import annotations

import random

import pytest

from common.models import Decision, ParentRef
from peer.engine.acquire import (
    BUSY_BACKOFF,
    BUSY_PATIENCE,
    BUSY_PATIENCE_ON_DEMAND,
    ON_DEMAND_STALL,
    ON_DEMAND_WAIT,
    ORIGIN_ATTEMPTS,
    OUTAGE_PATIENCE,
    OUTAGE_POLL,
    OUTAGE_STALL,
    PARENT_ROUNDS,
    Acquisition,
    AcquisitionError,
    Ask,
    AwaitScheduler,
    Decided,
    Fetch,
    FromOrigin,
    GiveUp,
    NoDecision,
    OriginFailed,
    ParentsFailed,
    Pause,
    Paused,
    Waited,
    bypass,
)

CHUNK = "blake3:" + "ab" * 32
A, B, C = (ParentRef(id=n, addr=f"{n}:1") for n in "abc")
T0 = 1000.0


def parents(*refs: ParentRef) -> Decided:
    return Decided(Decision(piece=0, action="parents", chunk=CHUNK, parents=list(refs)))


def lease(epoch: int, first: int = 0, last: int = 3) -> Decided:
    return Decided(Decision(piece=0, action="source", epoch=epoch, first=first, last=last,
                            reason="no-holder"))


def machine() -> Acquisition:
    return Acquisition(random.Random(7))


def test_the_first_step_asks_the_scheduler_excluding_nobody() -> None:
    assert machine().start(T0) == Ask(frozenset())


def test_parents_decided_are_fetched_with_blame() -> None:
    m = machine()
    m.start(T0)
    step = m.send(parents(A, B), T0)
    assert step == Fetch(CHUNK, (A, B), report=True)
    assert (step.source, step.reason) == ("peer", None)


def test_failed_parents_are_excluded_and_after_the_rounds_the_origin() -> None:
    m = machine()
    m.start(T0)
    failed: set[str] = set()
    for n, ref in enumerate([A, B, C][:PARENT_ROUNDS], 1):
        m.send(parents(ref), T0)
        step = m.send(ParentsFailed(frozenset({ref.id})), T0)
        failed.add(ref.id)
        if n < PARENT_ROUNDS:
            assert step == Ask(frozenset(failed)), "the next round excludes every failed one"
    assert step == FromOrigin("parents-failed")
    assert step.epoch is None, "a piece alone, no lease"


def test_busy_parents_back_off_with_jitter_then_origin_after_the_patience() -> None:
    m = machine()
    m.start(T0)
    now = T0
    m.send(parents(A), now)
    step = m.send(ParentsFailed(), now)
    assert isinstance(step, Pause)
    assert 0.5 * BUSY_BACKOFF <= step.seconds <= 1.5 * BUSY_BACKOFF
    assert m.send(Paused(), now) == Ask(frozenset()), "busy is load: nobody excluded"
    assert m.rounds == 0, "and no round burnt"
    now = T0 + BUSY_PATIENCE - 0.01
    m.send(parents(A), now)
    assert isinstance(m.send(ParentsFailed(), now), Pause)
    m.send(Paused(), now)
    now = T0 + BUSY_PATIENCE
    m.send(parents(A), now)
    assert m.send(ParentsFailed(), now) == FromOrigin("parents-busy")


def test_an_on_demand_read_is_patient_with_busy_parents_only_briefly() -> None:
    m = machine()
    m.start(T0)
    m.send(parents(A), T0)
    assert isinstance(m.send(ParentsFailed(), T0, on_demand=True), Pause)
    m.send(Paused(), T0)
    later = T0 + BUSY_PATIENCE_ON_DEMAND
    m.send(parents(A), later)
    assert m.send(ParentsFailed(), later, on_demand=True) == FromOrigin("parents-busy")


def test_the_jitter_comes_from_the_random_source() -> None:
    class Fixed:
        def uniform(self, a: float, b: float) -> float:
            return b

    m = Acquisition(Fixed())
    m.start(T0)
    m.send(parents(A), T0)
    assert m.send(ParentsFailed(), T0) == Pause(1.5 * BUSY_BACKOFF)


def test_a_lease_goes_to_the_origin_for_its_run_and_is_retried_then_given_up() -> None:
    m = machine()
    m.start(T0)
    step = m.send(lease(1), T0)
    assert step == FromOrigin("no-holder", 1, 0, 3)
    for epoch in range(2, ORIGIN_ATTEMPTS + 1):
        assert m.send(OriginFailed(), T0) == Ask(frozenset()), "asked again: a new epoch"
        assert m.send(lease(epoch), T0) == FromOrigin("no-holder", epoch, 0, 3)
    assert m.send(OriginFailed(), T0) == GiveUp()


def test_a_lapsed_lease_is_asked_about_again_and_never_counts_as_an_origin_failure() -> None:
    m = machine()
    m.start(T0)
    for epoch in range(1, 2 * ORIGIN_ATTEMPTS):
        assert m.send(lease(epoch), T0) == FromOrigin("no-holder", epoch, 0, 3)
        assert m.send(OriginFailed(lapsed=True), T0) == Ask(frozenset())
    assert m.origin_failures == 0


def test_an_origin_piece_without_a_lease_is_not_retried() -> None:
    m = machine()
    m.start(T0)
    bypassed = Decided(Decision(piece=0, action="source", reason="on-demand-wait"))
    assert m.send(bypassed, T0) == FromOrigin("on-demand-wait")
    assert m.send(OriginFailed(), T0) == GiveUp()


def test_scheduler_down_tries_the_last_known_holders_without_blame_then_the_origin() -> None:
    m = machine()
    m.start(T0)
    step = m.send(NoDecision(unavailable=True, known=(CHUNK, [A, B])), T0)
    assert step == Fetch(CHUNK, (A, B), report=False)
    # None of them has it: then as without them, the outage rules (waited out here).
    assert m.send(ParentsFailed(frozenset({"a"})), T0) == AwaitScheduler(OUTAGE_POLL)
    assert m.exclude == set(), "holders tried without a scheduler are not excluded later"
    m2 = machine()
    m2.start(T0)
    m2.send(NoDecision(unavailable=False, known=(CHUNK, [A])), T0)
    assert m2.send(ParentsFailed(frozenset({"a"})), T0) == FromOrigin("scheduler-unreachable")


def test_a_refusing_scheduler_is_not_waited_for() -> None:
    m = machine()
    m.start(T0)
    assert m.send(NoDecision(unavailable=False), T0) == FromOrigin("scheduler-unreachable")


def test_a_scheduler_lost_moments_ago_is_waited_for_and_asked_again_when_back() -> None:
    m = machine()
    m.start(T0)
    step = m.send(NoDecision(unavailable=True), T0 + 2.0)  # the call itself took 2 s
    assert step == AwaitScheduler(OUTAGE_POLL)
    assert m.send(Waited(back=True, recently_lost=False), T0 + 2.1) == Ask(frozenset())


def test_the_read_ahead_waits_out_an_outage_up_to_the_patience_then_the_origin() -> None:
    m = machine()
    m.start(T0)
    m.send(NoDecision(unavailable=True), T0)
    now = T0 + OUTAGE_PATIENCE - 0.1
    step = m.send(Waited(back=False, recently_lost=True), now)
    assert step == AwaitScheduler(pytest.approx(0.1))
    assert m.send(Waited(back=False, recently_lost=True), T0 + OUTAGE_PATIENCE) \
        == FromOrigin("scheduler-unreachable")


def test_a_blocked_reader_bounds_the_outage_wait_from_when_it_began_waiting() -> None:
    m = machine()
    m.start(T0)
    m.send(NoDecision(unavailable=True), T0)
    blocked = T0 + 1.0
    step = m.send(Waited(back=False, recently_lost=True), blocked + OUTAGE_STALL - 0.1,
                  waiting_since=blocked)
    assert isinstance(step, AwaitScheduler)
    assert m.send(Waited(back=False, recently_lost=True), blocked + OUTAGE_STALL,
                  waiting_since=blocked) == FromOrigin("scheduler-unreachable")
    m2 = machine()
    m2.start(T0)
    assert m2.send(NoDecision(unavailable=True), T0 + ON_DEMAND_STALL, on_demand=True,
                   waiting_since=T0) == FromOrigin("scheduler-unreachable")


def test_a_scheduler_long_gone_ends_the_wait_at_once() -> None:
    m = machine()
    m.start(T0)
    m.send(NoDecision(unavailable=True), T0)
    assert m.send(Waited(back=False, recently_lost=False), T0 + 0.25) \
        == FromOrigin("scheduler-unreachable")


def test_events_that_cannot_follow_the_step_are_refused() -> None:
    m = machine()
    with pytest.raises(AcquisitionError):
        m.send(Paused(), T0)  # not started
    m.start(T0)
    with pytest.raises(AcquisitionError):
        m.send(OriginFailed(), T0)
    m.send(parents(A), T0)
    with pytest.raises(AcquisitionError):
        m.send(parents(A), T0)


# -- the on-demand bypass, applied by the batcher to each decision --------------------------

def wait(reason: str) -> Decision:
    return Decision(piece=3, action="wait", reason=reason)


def test_an_on_demand_read_that_waited_for_a_lease_holder_goes_to_the_origin_alone() -> None:
    answer = bypass(wait("lease-held"), on_demand=True, waited=ON_DEMAND_WAIT)
    assert answer == Decision(piece=3, action="source", reason="on-demand-wait")
    assert answer.epoch is None


def test_the_bypass_waits_for_a_lease_holder_up_to_on_demand_wait() -> None:
    assert bypass(wait("lease-held"), on_demand=True, waited=ON_DEMAND_WAIT - 0.01) is None
    assert bypass(wait("lease-held"), on_demand=False, waited=60.0) is None


def test_busy_holders_are_never_bypassed_to_the_origin() -> None:
    assert bypass(wait("holders-busy"), on_demand=True, waited=60.0) is None


def test_a_decision_that_is_not_a_wait_passes_unchanged() -> None:
    d = Decision(piece=1, action="source", epoch=4, first=1, last=2, reason="no-holder")
    assert bypass(d, on_demand=True, waited=60.0) is d
