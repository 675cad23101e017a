"""Parked schedule calls: an announcement wakes only the calls asking for a piece it added, and
those re-decide only the pieces announced since their last decision (for the others nothing
changed); a task-wide change (sealed, a lease freed) and the recheck timer re-decide them all."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from common.models import (
    Announce,
    Decision,
    PeerRegistration,
    PieceClaim,
    ScheduleRequest,
    TaskRequest,
)
from scheduler import state, store
from scheduler.store import Waiters
from scheduler.waiting import Parked, Parking, call_key, done, wakes

TASK = "sha256:" + "a" * 64


def waits(pieces: tuple[int, ...], reason: str | None = "holders-busy") -> list[Decision]:
    return [Decision(piece=i, action="wait", reason=reason) for i in pieces]


# -- the pure core ----------------------------------------------------------------------------

def test_a_parked_call_re_decides_only_what_was_announced_and_merges_the_rest() -> None:
    parking = Parking()
    call = Parked([3, 1, 2, 1], recheck=0.25)
    parking.park(call)
    assert call.begin(0.0) == (3, 1, 2)  # the first decision: every piece, once each
    assert call.decided(waits((3, 1, 2))) == waits((3, 1, 2))
    assert call.idle()

    assert parking.announced([2, 9], per_piece=4) == [call]
    assert call.begin(0.1) == (2,)
    answer = call.decided([Decision(piece=2, action="parents", chunk="c", parents=[])])
    assert [(d.piece, d.action) for d in answer] == [(3, "wait"), (1, "wait"), (2, "parents")]
    assert done(answer)
    assert answer[0].reason == "holders-busy"  # as last decided

    assert parking.announced([7], per_piece=4) == []  # not its piece: nothing to re-decide
    assert call.idle() and call.begin(0.2) == ()


def test_the_recheck_timer_runs_from_the_last_full_decision_whatever_woke_the_call() -> None:
    parking = Parking()
    call = Parked([0, 1, 2], recheck=0.25)
    parking.park(call)
    call.begin(0.0)
    call.decided(waits((0, 1, 2)))
    for t in (0.1, 0.2):  # woken often by piece 1: the timer is not pushed back
        assert call.idle()
        parking.announced([1], per_piece=4)
        assert call.begin(t) == (1,)
        call.decided(waits((1,)))
        assert call.recheck_at == 0.25
    assert call.idle()
    call.changed_all()  # the driver's timer fired
    assert call.begin(0.25) == (0, 1, 2) and call.recheck_at == 0.5


def test_a_task_wide_change_re_decides_every_piece_of_every_call() -> None:
    parking = Parking()
    calls = [Parked([i, i + 1], recheck=0.25) for i in range(3)]
    for c in calls:
        parking.park(c)
        c.begin(0.0)
        c.decided(waits(c.pieces))
        assert c.idle()
    parking.announced([1], per_piece=4)
    assert parking.everyone() == calls
    assert [c.begin(0.1) for c in calls] == [(0, 1), (1, 2), (2, 3)]


def test_a_crowd_is_woken_oldest_first_and_those_deciding_decide_it_again() -> None:
    parking = Parking()
    calls = [Parked([5, 6], recheck=60.0) for _ in range(5)]
    for c in calls:
        parking.park(c)
        c.begin(0.0)
        c.decided(waits(c.pieces))
        assert c.idle()
    assert parking.announced([5], per_piece=2) == calls[:2]
    assert parking.announced([5], per_piece=2) == calls[2:4]  # the first two are woken already
    # Two pieces: room for 2 x 2, the oldest not yet woken, whichever piece they park on.
    assert parking.announced([6, 5], per_piece=2) == calls[4:]
    assert calls[4].begin(0.1) == (5, 6)
    late = Parked([8], recheck=60.0)
    parking.park(late)
    late.begin(0.0)
    late.decided(waits((8,)))
    assert late.idle()
    assert parking.announced([5, 6], per_piece=2) == []  # every call on 5 and 6 is woken
    assert calls[0].begin(0.2) == (5, 6)  # woken (deciding) when they landed: decided again
    assert parking.announced([8], per_piece=0) == [late]  # 0: every one


def test_a_change_while_deciding_is_decided_next_not_lost() -> None:
    parking = Parking()
    call = Parked([0, 1], recheck=0.25)
    parking.park(call)
    assert call.begin(0.0) == (0, 1)
    assert parking.announced([1], per_piece=4) == []  # deciding: no need to wake it
    call.decided(waits((0, 1)))
    assert not call.idle()  # so it decides again before it waits
    assert call.begin(0.0) == (1,)
    call.decided(waits((1,)))
    assert call.idle()
    parking.unpark(call)
    assert len(parking) == 0 and parking.announced([0, 1], per_piece=4) == []


def test_which_calls_an_announcement_concerns() -> None:
    claims = [PieceClaim(index=i, chunk=f"blake3:{i:064x}") for i in (4, 2)]
    assert wakes(Announce(peer_id="p", task_id=TASK, pieces=claims)) == {2, 4}
    assert wakes(Announce(peer_id="p", task_id=TASK, pieces=[])) == frozenset()
    assert wakes(Announce(peer_id="p", task_id=TASK, pieces=claims, sealed=True)) is None


# -- Waiters, the core's async driver -------------------------------------------------------

class Rules:
    """A `decide` whose answer is `wait` until a piece is made ready; records what it was
    asked (each call's pieces)."""

    def __init__(self) -> None:
        self.ready: set[int] = set()
        self.asked: list[tuple[str, tuple[int, ...]]] = []
        self.changed = asyncio.Event()

    async def decide(self, req: ScheduleRequest,
                     pieces: tuple[int, ...] | None = None) -> list[Decision]:
        asked = tuple(req.pieces if pieces is None else pieces)
        self.asked.append((req.peer_id, asked))
        self.changed.set()
        return [Decision(piece=i, action="source" if i in self.ready else "wait")
                for i in dict.fromkeys(asked)]

    async def asked_by(self, peer: str, n: int) -> list[tuple[int, ...]]:
        """Once `peer` was asked n times, what it was asked."""
        while len(mine := [p for who, p in self.asked if who == peer]) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)
        return mine


def park(waiters: Waiters, rules: Rules, peer: str, pieces: list[int],
         wait_ms: int = 5000) -> asyncio.Task[list[Decision]]:
    req = ScheduleRequest(peer_id=peer, task_id=TASK, pieces=pieces, wait_ms=wait_ms)
    return asyncio.create_task(waiters.schedule(req, rules.decide))


async def test_an_announcement_re_decides_only_its_pieces_of_the_calls_asking_for_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)  # no periodic re-decide in between
    waiters, rules = Waiters(), Rules()
    a, b = park(waiters, rules, "a", [4, 5, 6]), park(waiters, rules, "b", [7, 8])
    assert await rules.asked_by("a", 1) == [(4, 5, 6)]  # decided once, in full, and parked
    assert await rules.asked_by("b", 1) == [(7, 8)]
    await asyncio.sleep(0)
    assert waiters.waiting(TASK) == 2

    waiters.notify(TASK, [5])  # still a wait: only piece 5 re-decided, the call parks again
    assert await rules.asked_by("a", 2) == [(4, 5, 6), (5,)]
    rules.ready.add(7)
    waiters.notify(TASK, [7, 1])
    answer = await b
    assert [(d.piece, d.action) for d in answer] == [(7, "source"), (8, "wait")]
    assert await rules.asked_by("b", 2) == [(7, 8), (7,)]
    assert len(await rules.asked_by("a", 2)) == 2 and not a.done()  # 7 is not its piece

    rules.ready.add(6)
    waiters.notify(TASK)  # task-wide: every piece re-decided
    assert [d.action for d in await a] == ["wait", "wait", "source"]
    assert (await rules.asked_by("a", 3))[-1] == (4, 5, 6)
    assert waiters.waiting(TASK) == 0


async def test_the_recheck_timer_re_decides_every_piece(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 0.02)
    waiters, rules = Waiters(), Rules()
    call = park(waiters, rules, "a", [1, 2])
    assert await rules.asked_by("a", 3) == [(1, 2)] * 3  # nothing woke it: the timer did
    rules.ready.add(2)
    assert [d.action for d in await call] == ["wait", "source"]


async def test_a_long_poll_ends_with_its_last_answer_at_its_deadline() -> None:
    waiters, rules = Waiters(), Rules()
    answer = await park(waiters, rules, "a", [1, 2], wait_ms=50)
    assert [d.action for d in answer] == ["wait", "wait"]
    assert rules.asked == [("a", (1, 2))]  # nothing changed: no decision again at the end
    assert waiters.waiting(TASK) == 0


async def test_a_re_decision_names_its_pieces_of_the_request_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Woken for some of its pieces, a call decides those of its own request (`pieces`), not
    a copy of the request with only them (a `model_copy` per re-decision and per part)."""
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)
    waiters, rules = Waiters(), Rules()
    req = ScheduleRequest(peer_id="a", task_id=TASK, pieces=[1, 2, 3], wait_ms=5000)
    seen: list[tuple[ScheduleRequest, tuple[int, ...] | None]] = []

    async def decide(r: ScheduleRequest, pieces: tuple[int, ...] | None) -> list[Decision]:
        seen.append((r, pieces))
        return await rules.decide(r, pieces)

    call = asyncio.create_task(waiters.schedule(req, decide))
    await rules.asked_by("a", 1)
    rules.ready.add(3)
    waiters.notify(TASK, [3])
    assert [d.action for d in await call] == ["wait", "wait", "source"]
    assert [(r is req, pieces) for r, pieces in seen] == [(True, None), (True, (3,))]


async def test_a_call_woken_often_still_answers_at_its_deadline_and_rechecks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Wake-ups that change nothing move neither the recheck nor the deadline (one timer per
    call, not a timeout per wait)."""
    monkeypatch.setattr(store, "RECHECK_SECONDS", 0.05)
    waiters, rules = Waiters(), Rules()
    loop = asyncio.get_running_loop()
    start = loop.time()
    call = park(waiters, rules, "a", [1, 2], wait_ms=180)
    while not call.done():
        waiters.notify(TASK, [2])  # woken for piece 2, which stays `wait`
        await asyncio.sleep(0.005)
    took = loop.time() - start
    assert [d.action for d in call.result()] == ["wait", "wait"]
    assert 0.17 <= took < 1.0
    full = [p for who, p in rules.asked if p == (1, 2)]
    assert 3 <= len(full) <= 5  # the first decision and a recheck every 50 ms of 180
    assert waiters.waiting(TASK) == 0


async def test_a_change_while_the_first_decision_is_made_is_not_lost(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store whose decide awaits (Redis) may hear of a change meanwhile: the call was
    registered before it decided, so it re-decides that piece before it parks."""
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)
    waiters, rules = Waiters(), Rules()
    gate = asyncio.Event()

    async def decide(req: ScheduleRequest, pieces: tuple[int, ...] | None) -> list[Decision]:
        if not rules.asked:
            assert pieces is None  # the first decision: the whole request
            waiters.notify(TASK, [2])  # lands while this first decision is being made
            rules.ready.add(2)
            await gate.wait()
            answer = [Decision(piece=i, action="wait") for i in req.pieces]
            rules.asked.append((req.peer_id, tuple(req.pieces)))
            return answer
        return await rules.decide(req, pieces)

    call = asyncio.create_task(waiters.schedule(
        ScheduleRequest(peer_id="a", task_id=TASK, pieces=[1, 2], wait_ms=5000), decide))
    await asyncio.sleep(0)
    gate.set()
    assert [d.action for d in await call] == ["wait", "source"]
    assert rules.asked == [("a", (1, 2)), ("a", (2,))]


async def test_a_store_that_watches_decides_every_piece_again_once_it_listens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)
    watched: Counter[str] = Counter()

    async def watch(task_id: str) -> None:
        watched[task_id] += 1

    def unwatch(task_id: str) -> None:
        watched[task_id] -= 1

    waiters, rules = Waiters(watch, unwatch), Rules()
    call = park(waiters, rules, "a", [1, 2])
    assert await rules.asked_by("a", 2) == [(1, 2), (1, 2)]
    assert watched[TASK] == 1
    rules.ready.add(1)
    waiters.notify(TASK, [1])
    assert [d.action for d in await call] == ["source", "wait"]
    assert rules.asked[-1] == ("a", (1,)) and watched[TASK] == 0
    # An answer at once: no watch at all.
    assert (await park(waiters, rules, "b", [1]))[0].action == "source"
    assert watched[TASK] == 0 and waiters.waiting(TASK) == 0


async def test_an_announcement_wakes_a_few_of_a_crowd_oldest_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)
    waiters = Waiters()
    crowd = 5 * store.WAKE_PER_PIECE
    ready: set[str] = set()  # the peers whose next decision is not a wait
    decided: Counter[str] = Counter()
    all_parked = asyncio.Event()

    async def decide(req: ScheduleRequest, _: tuple[int, ...] | None) -> list[Decision]:
        decided[req.peer_id] += 1
        if decided.total() == crowd:  # each call decides once and parks
            all_parked.set()
        return [Decision(piece=3, action="parents" if req.peer_id in ready else "wait")]

    calls = []
    for n in range(crowd):
        req = ScheduleRequest(peer_id=f"p{n:02d}", task_id=TASK, pieces=[3], wait_ms=5000)
        calls.append(asyncio.create_task(waiters.schedule(req, decide)))
        await asyncio.sleep(0)  # parked in this order
    await all_parked.wait()
    await asyncio.sleep(0)
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

    waiters.notify_all()  # every call re-decides
    await asyncio.wait(calls, timeout=5)
    assert all(c.done() for c in calls) and waiters.waiting(TASK) == 0


def answered(parking: Parking, key: object, pieces: tuple[int, ...], now: float,
             ready: int) -> Parked:
    """A call decided at `now`, parked, then answered because `ready` is not a wait."""
    call = parking.take(key, pieces, 0.25, now)
    parking.park(call)
    due = call.begin(now)
    call.decided([Decision(piece=i, action="parents" if i == ready else "wait",
                           reason=None if i == ready else "holders-busy", parents=[])
                  for i in due])
    parking.leave(call, key, now)
    return call


def test_a_peers_next_call_takes_over_the_waits_it_was_just_answered_with() -> None:
    parking = Parking()
    answered(parking, "p", (1, 2, 3), 0.0, ready=1)
    assert len(parking) == 0 and not parking.empty(0.1)
    parking.announced([3], per_piece=4)  # remembered: recorded, never woken
    nxt = parking.take("p", (2, 3, 4, 1), 0.25, 0.1)
    # 2 is as last decided; 3 was announced since, 4 is new, 1 was not a wait: due.
    assert nxt.begin(0.1) == (3, 4, 1)
    assert nxt.recheck_at == 0.25  # as old as the wait it took over
    answer = nxt.decided(waits((3, 4, 1)))
    assert [d.piece for d in answer] == [2, 3, 4, 1] and not done(answer)
    assert parking.empty(0.1)  # taken: nothing remembered any more


def test_remembered_waits_hold_only_for_the_same_key_within_the_recheck_time() -> None:
    parking = Parking()
    answered(parking, ("p", ()), (1, 2), 0.0, ready=1)
    other = parking.take(("p", ("q",)), (2,), 0.25, 0.1)  # other parents excluded
    assert other.begin(0.1) == (2,) and other.recheck_at == 0.35
    answered(parking, "p", (1, 2), 0.0, ready=1)
    late = parking.take("p", (2,), 0.25, 0.3)  # past the first decision's recheck time
    assert late.begin(0.3) == (2,) and late.recheck_at == 0.55
    answered(parking, "p", (1, 2), 1.0, ready=1)
    parking.everyone()  # a task-wide change: what was remembered may be wrong
    assert parking.empty(1.0)
    assert parking.take("p", (2,), 0.25, 1.1).begin(1.1) == (2,)
    answered(parking, "p", (1, 2), 2.0, ready=1)
    assert not parking.empty(2.1) and parking.empty(2.25)  # forgotten at its recheck time


async def test_a_peers_next_call_decides_only_what_its_last_answer_did_not_settle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)
    waiters, rules = Waiters(), Rules()
    first = park(waiters, rules, "a", [1, 2, 3])
    await rules.asked_by("a", 1)
    await asyncio.sleep(0)
    rules.ready.add(1)
    waiters.notify(TASK, [1])
    assert [d.action for d in await first] == ["source", "wait", "wait"]
    waiters.notify(TASK, [3])  # nobody parked on 3 any more; remembered all the same
    again = park(waiters, rules, "a", [2, 3, 4])  # the batcher asks again, and for more
    assert await rules.asked_by("a", 3) == [(1, 2, 3), (1,), (3, 4)]
    rules.ready.add(2)
    waiters.notify(TASK, [2])
    assert [d.action for d in await again] == ["source", "wait", "wait"]


def test_an_announcement_wakes_as_many_as_each_piece_has_room_for() -> None:
    parking = Parking()
    calls = [Parked([5, 6] if n < 4 else [6], recheck=60.0) for n in range(6)]
    for c in calls:
        parking.park(c)
        c.begin(0.0)
        c.decided(waits(c.pieces))
        assert c.idle()
    # Room for 2 on piece 5 and 3 on piece 6: the two oldest take both, one more for 6.
    assert parking.announced([5, 6], {5: 2, 6: 3}) == calls[:3]
    # Those woken already count against a piece's room: they decide it too.
    assert parking.announced([6], {6: 4}) == [calls[3]]
    assert parking.announced([6], {6: 0}) == []  # no room: nobody woken
    assert calls[0].begin(0.1) == (5, 6)


class ByGroup:
    """A room by group (as `scheduler.state.Room` by IDC): `left` places per group, `most` in
    all."""

    def __init__(self, group: dict[str, str], left: dict[str, int], most: int) -> None:
        self.group, self.left, self.most = group, left, most

    def take(self, peer: str | None) -> bool:
        g = self.group[peer or ""]
        if self.most <= 0 or self.left[g] <= 0:
            return False
        self.left[g] -= 1
        self.most -= 1
        return True

    def spent(self) -> bool:
        return self.most <= 0


def test_a_room_by_idc_wakes_the_oldest_calls_its_idc_has_places_for() -> None:
    """Calls of a full IDC are passed over (their `wait` stands), not woken to wait again; a
    call already deciding takes a place of its IDC too; the walk stops once nobody may come."""
    parking = Parking()
    peers = ["a1", "b1", "a2", "b2", "a3", "b3"]
    calls = [parking.take(call_key(ScheduleRequest(peer_id=p, task_id=TASK, pieces=[7])), [7],
                          60.0, 0.0) for p in peers]
    for c in calls:
        parking.park(c)
        c.begin(0.0)
        c.decided(waits(c.pieces))
        assert c.idle()
    assert [c.peer for c in calls] == peers
    group = {p: p[0] for p in peers}
    assert parking.announced([7], {7: ByGroup(group, {"a": 0, "b": 2}, 5)}) \
        == [calls[1], calls[3]]
    assert not calls[0].woken and calls[1].begin(0.1) == (7,)
    # b1 is deciding (woken): it takes b's one place; a has two, and the room stops at 2 in all.
    room = ByGroup(group, {"a": 2, "b": 1}, 2)
    assert parking.announced([7], {7: room}) == [calls[0]]
    assert room.spent() and room.left == {"a": 1, "b": 0}


async def test_the_memory_store_wakes_the_calls_an_announcement_has_room_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A crowd parked on one piece: a child that finishes makes room for three (its place and
    two children of its own: a share of two per holder, set here), and only the three oldest
    re-decide."""
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)
    monkeypatch.setattr(state, "CHILDREN_PER_HOLDER", 2)
    ms = store.MemoryStore(lease_timeout=30.0)
    crowd = [f"c{n}" for n in range(10)]
    for n, pid in enumerate(["h", *crowd]):
        await ms.register(PeerRegistration(id=pid, upload_addr=f"10.0.0.{n + 1}:1"))
    await ms.ensure_task(TaskRequest(task_id=TASK, length=1 << 20, piece_size=1 << 20))
    claim = [PieceClaim(index=0, chunk="blake3:" + "0" * 64)]
    await ms.announce(Announce(peer_id="h", task_id=TASK, pieces=claim))
    decided: Counter[str] = Counter()
    decide = ms._decide

    async def counting(req: ScheduleRequest,
                       pieces: tuple[int, ...] | None = None) -> list[Decision]:
        decided[req.peer_id] += 1
        return await decide(req, pieces)

    monkeypatch.setattr(ms, "_decide", counting)
    calls = []
    for pid in crowd:
        calls.append(asyncio.create_task(ms.schedule(
            ScheduleRequest(peer_id=pid, task_id=TASK, pieces=[0], wait_ms=5000))))
        await asyncio.sleep(0)
    first = await asyncio.gather(*calls[:2])
    assert [d[0].action for d in first] == ["parents", "parents"]
    await asyncio.sleep(0.01)
    assert ms.waiters.waiting(TASK) == 8 and decided.total() == 10

    await ms.announce(Announce(peer_id="c0", task_id=TASK, pieces=claim))
    woken = await asyncio.gather(*calls[2:5])
    assert [d[0].action for d in woken] == ["parents"] * 3
    await asyncio.sleep(0.01)
    assert decided.total() == 13 and ms.waiters.waiting(TASK) == 5
    ms.waiters.notify_all()
    await asyncio.gather(*calls[5:])


def test_a_call_woken_for_one_piece_re_decides_that_one_and_keeps_its_other_waits() -> None:
    """The room an announcement made went to the calls parked longest: the others keep their
    wait for that piece, even when woken for another, until their recheck time."""
    parking = Parking()
    calls = [Parked([1, 2], recheck=60.0) for _ in range(2)]
    for c in calls:
        parking.park(c)
        c.begin(0.0)
        c.decided(waits(c.pieces))
        assert c.idle()
    assert parking.announced([1], {1: 1}) == [calls[0]]  # room for one: the oldest
    assert calls[0].begin(0.1) == (1,)
    calls[0].decided(waits((1,)))
    assert calls[0].idle()
    assert parking.announced([2], {2: 2}) == calls
    assert [c.begin(0.2) for c in calls] == [(2,), (2,)]  # not 1 again: its room was taken
    calls[1].decided(waits((2,)))
    assert calls[1].idle()
    calls[1].changed_all()  # the recheck timer
    assert calls[1].begin(0.3) == (1, 2)
