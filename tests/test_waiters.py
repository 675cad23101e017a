"""Parked schedule calls: an announcement wakes only the calls asking for a piece it added
(for the others nothing changed); a task-wide change (sealed, a lease freed) wakes them all."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from common.models import Decision, ScheduleRequest
from scheduler import store
from scheduler.store import Waiters

TASK = "sha256:" + "a" * 64


async def test_an_announcement_wakes_only_calls_for_its_pieces(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)  # no periodic re-decide in between
    waiters = Waiters()
    ready: set[int] = set()
    decided: Counter[int] = Counter()
    both_parked = asyncio.Event()

    async def decide(req: ScheduleRequest) -> list[Decision]:
        decided[req.pieces[0]] += 1
        if decided.total() == 4:  # each call decides once, registers, decides again, parks
            both_parked.set()
        return [Decision(piece=i, action="source" if i in ready else "wait")
                for i in req.pieces]

    def park(piece: int) -> asyncio.Task[list[Decision]]:
        req = ScheduleRequest(peer_id=f"p{piece}", task_id=TASK, pieces=[piece], wait_ms=5000)
        return asyncio.create_task(waiters.schedule(req, decide))

    five, seven = park(5), park(7)
    await both_parked.wait()
    assert waiters.waiting(TASK) == 2
    before = Counter(decided)

    ready.add(7)
    waiters.notify(TASK, [7])
    assert (await seven)[0].action == "source"
    assert decided[5] == before[5]  # not woken: piece 7 changes nothing for it
    assert not five.done()

    ready.add(5)
    waiters.notify(TASK)  # task-wide: everyone re-decides
    assert (await five)[0].action == "source"
    assert waiters.waiting(TASK) == 0


async def test_an_announcement_wakes_a_few_of_a_crowd_oldest_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)
    waiters = Waiters()
    crowd = 5 * store.WAKE_PER_PIECE
    ready: set[str] = set()  # the peers whose next decision is not a wait
    decided: Counter[str] = Counter()
    all_parked = asyncio.Event()

    async def decide(req: ScheduleRequest) -> list[Decision]:
        decided[req.peer_id] += 1
        if decided.total() == 2 * crowd:
            all_parked.set()
        return [Decision(piece=3, action="parents" if req.peer_id in ready else "wait")]

    calls = []
    for n in range(crowd):
        req = ScheduleRequest(peer_id=f"p{n:02d}", task_id=TASK, pieces=[3], wait_ms=5000)
        calls.append(asyncio.create_task(waiters.schedule(req, decide)))
        await asyncio.sleep(0)  # parked in this order
    await all_parked.wait()
    before = Counter(decided)

    # Piece 3 announced: only the oldest few re-decide (and, admitted, return).
    ready.update(f"p{n:02d}" for n in range(crowd))
    waiters.notify(TASK, [3])
    first = calls[:store.WAKE_PER_PIECE]
    await asyncio.wait(first, timeout=5)
    assert all(c.done() for c in first)
    await asyncio.sleep(0.05)
    woken = {p for p in decided if decided[p] > before[p]}
    assert woken == {f"p{n:02d}" for n in range(store.WAKE_PER_PIECE)}
    assert waiters.waiting(TASK) == crowd - store.WAKE_PER_PIECE

    waiters.notify(TASK)  # task-wide: every call re-decides
    await asyncio.wait(calls, timeout=5)
    assert all(c.done() for c in calls) and waiters.waiting(TASK) == 0
