"""Claims that ride on the schedule call (issue 14: fewer calls per piece): the peer's queued
announcements leave with the call asking for its next pieces, against a real scheduler API on
loopback; a scheduler from before the field (a small real server refusing it, as its models
did) gets them apart; a withdrawal never overtakes claims out with a schedule call."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel

from common.models import (
    Announce,
    Heartbeat,
    PeerRegistration,
    PieceClaim,
    ScheduleRequest,
    TaskRequest,
)
from peer import sched_outbox
from peer.sched_outbox import (
    ANNOUNCE_COALESCE,
    RIDE_RECENT,
    RIDE_WAIT,
    RIDE_WAIT_ORIGIN,
    Outbox,
    ride_ends,
    ride_wait,
)
from peer.sched_transport import HttpTransport, R
from peer.scheduler_client import SchedulerClient
from scheduler.api import SchedulerAPI
from scheduler.state import ClusterState
from scheduler.store import MemoryStore
from tests.cluster import free_port, member_session, serve, until
from tests.test_scheduler_client import StateSession, _true

TASK = "sha256:" + "a" * 64
MiB = 1 << 20
SECRET = b"k" * 32


def chunk(n: int) -> str:
    return f"blake3:{n:064x}"


@dataclass
class Recording:
    """The peer's HTTP transport, remembering what it sent."""

    inner: HttpTransport
    sent: list[tuple[str, BaseModel | None]] = field(default_factory=list)

    async def post(self, url: str, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0) -> R | None:
        self.sent.append((path, body))
        return await self.inner.post(url, path, body, reply, seconds)

    def paths(self) -> list[str]:
        return [p.removeprefix("/api/v1/") for p, _ in self.sent]


class NothingHeld:
    def tasks(self) -> list:
        return []

    def drop_task(self, task_id: str) -> None:
        pass


@web.middleware
async def before_announce_rode_along(request: web.Request, handler):
    """A scheduler from before `announce` on schedule calls: its models refused the field."""
    if request.path == "/api/v1/schedule" and "announce" in json.loads(await request.read()):
        return web.json_response({"error": "invalid request body: announce: Extra inputs are "
                                           "not permitted"}, status=400)
    return await handler(request)


@pytest.fixture(params=["current", "before"])
async def scheduler(request: pytest.FixtureRequest
                    ) -> AsyncIterator[tuple[MemoryStore, str, bool]]:
    store = MemoryStore()
    app = SchedulerAPI(store, scheduler_id="s", secret=SECRET).app()
    before = request.param == "before"
    if before:
        app.middlewares.insert(0, before_announce_rode_along)
    port = free_port()
    runner = await serve(app, port)
    yield store, f"http://127.0.0.1:{port}", before
    await runner.cleanup()


async def test_queued_claims_ride_on_the_next_schedule_call(
        scheduler: tuple[MemoryStore, str, bool]) -> None:
    store, url, before = scheduler
    async with aiohttp.ClientSession() as http:
        transport = Recording(HttpTransport(http, SECRET))
        client = SchedulerClient([url], PeerRegistration(id="me", upload_addr="127.0.0.1:9"),
                                 http, NothingHeld(), Heartbeat, SECRET,  # type: ignore[arg-type]
                                 transport=transport)
        await client.start()
        try:
            await asyncio.wait_for(client.connected.wait(), 10)
            await client.ensure_task(TaskRequest(task_id=TASK, length=8 * MiB, piece_size=MiB))
            for round_ in range(2):
                first = 4 * round_
                for i in (first, first + 1):
                    client.announce(TASK, i, chunk(i))
                decisions = await client.schedule(TASK, [first + 2, first + 3], set(), 0)
                assert [d.action for d in decisions] == ["source", "source"]
                await until(lambda got=(first, first + 1): _true(_held(store, got)), 5,
                            "the claims recorded")
        finally:
            await client.stop(leave=False)
    calls = [p for p in transport.paths() if p in ("schedule", "announce")]
    schedules = [b for p, b in transport.sent if isinstance(b, ScheduleRequest)]
    carried = [s.announce for s in schedules if s.announce is not None]
    if not before:  # no announce call at all
        assert calls == ["schedule", "schedule"]
        assert [[c.index for c in a.pieces] for a in carried] == [[0, 1], [4, 5]]
    else:  # refused once, then asked plainly, the claims announced apart from then on
        assert [[c.index for c in a.pieces] for a in carried] == [[0, 1]]
        assert calls.count("announce") >= 1 and calls[:2] == ["schedule", "schedule"]
        assert all(s.announce is None for s in schedules[1:])


async def test_the_reply_is_as_before_unless_the_call_announced() -> None:
    """Peers from before `announced` refuse fields they do not know: only a call that carried
    claims gets the field."""
    store = MemoryStore()
    port = free_port()
    runner = await serve(SchedulerAPI(store, scheduler_id="s", secret=SECRET).app(), port)
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with member_session(SECRET) as s:
            for path, body in (
                    ("peers", PeerRegistration(id="me", upload_addr="127.0.0.1:9")),
                    ("peers", PeerRegistration(id="other", upload_addr="127.0.0.1:8")),
                    ("tasks", TaskRequest(task_id=TASK, length=8 * MiB, piece_size=MiB))):
                async with s.post(f"{base}/{path}", data=body.model_dump_json()) as r:
                    assert r.status == 200
            plain = ScheduleRequest(peer_id="me", task_id=TASK, pieces=[0])
            async with s.post(f"{base}/schedule", data=plain.model_dump_json()) as r:
                assert r.status == 200 and set(await r.json()) == {"decisions"}
            claims = Announce(peer_id="me", task_id=TASK,
                              pieces=[PieceClaim(index=0, chunk=chunk(0))])
            both = plain.model_copy(update={"pieces": [1], "announce": claims})
            async with s.post(f"{base}/schedule", data=both.model_dump_json()) as r:
                body = await r.json()
                assert r.status == 200, body
                assert body["announced"] == {"accepted": 1, "rejected": [], "deferred": []}
            assert store.state.tasks[TASK].pieces[0].holders == {"me"}
            # Another peer's claims are not the requester's to make.
            forged = plain.model_copy(update={"peer_id": "other", "announce": claims})
            async with s.post(f"{base}/schedule", data=forged.model_dump_json()) as r:
                assert r.status == 400
                assert "requester" in (await r.json())["error"]
    finally:
        await runner.cleanup()


def _held(store: MemoryStore, pieces: tuple[int, ...]) -> bool:
    known = store.state.tasks[TASK].pieces
    return all(i in known and known[i].holders == {"me"} for i in pieces)


def _outbox() -> tuple[Outbox, StateSession]:
    state = ClusterState(lease_timeout=30.0)
    state.register(PeerRegistration(id="me", upload_addr="127.0.0.1:9"), time.monotonic())
    state.ensure_task(TaskRequest(task_id=TASK, length=8 * MiB, piece_size=MiB), 0.0)
    session = StateSession(state)
    return Outbox("me", session), session


async def test_a_withdrawal_waits_for_the_claims_out_with_a_schedule_call() -> None:
    box, session = _outbox()
    loop = asyncio.create_task(box.run())
    try:
        box.announce(TASK, 0, chunk(0))
        ann = box.lend(TASK)
        assert ann is not None and [c.index for c in ann.pieces] == [0]
        box.withdraw(TASK, [0])  # evicted while the schedule call is out
        assert box.lend(TASK) is None  # a withdrawal never leaves with a schedule call
        await asyncio.sleep(0.1)
        assert session.sent == []  # held: it must not overtake the claim
        box.answered(ann, session.state.announce(ann, time.monotonic()))
        await until(lambda: _true(len(session.sent) == 1), 5, "the withdrawal")
        assert session.sent[0][0] == "/api/v1/withdraw"
        assert session.state.tasks[TASK].pieces[0].holders == set()
    finally:
        loop.cancel()


async def test_claims_of_a_schedule_call_that_failed_are_announced_by_the_outbox() -> None:
    box, session = _outbox()
    box.announce(TASK, 3, chunk(3))
    box.sealed(TASK)
    ann = box.lend(TASK)
    assert ann is not None and ann.sealed
    box.announce(TASK, 4, chunk(4))  # fetched while the call was out
    box.unsent(ann)
    loop = asyncio.create_task(box.run())
    try:
        await until(lambda: _true(len(session.sent) == 1), 5, "the announcement")
        (path, body), = session.sent
        assert path == "/api/v1/announce" and isinstance(body, Announce)
        assert [c.index for c in body.pieces] == [3, 4] and body.sealed
    finally:
        loop.cancel()


async def test_claims_of_a_task_being_read_wait_briefly_for_its_next_schedule_call() -> None:
    box, session = _outbox()
    loop = asyncio.create_task(box.run())
    try:
        assert box.lend(TASK) is None  # its reader asked for pieces: nothing queued yet
        box.announce(TASK, 0, chunk(0), source="peer")
        await asyncio.sleep(RIDE_WAIT / 3)
        assert session.sent == []  # waiting for the reader's next call
        ann = box.lend(TASK)
        assert ann is not None and [c.index for c in ann.pieces] == [0]
        box.answered(ann, session.state.announce(ann, time.monotonic()))
        # No call comes for the next claim: it goes alone once the wait is over.
        queued = time.monotonic()
        box.announce(TASK, 1, chunk(1), source="peer")
        await until(lambda: _true(len(session.sent) == 1), 5, "the claim sent alone")
        assert time.monotonic() - queued >= RIDE_WAIT
        assert session.state.tasks[TASK].pieces[1].holders == {"me"}
    finally:
        loop.cancel()


async def test_claims_waiting_for_a_schedule_call_wake_the_sender_once_not_per_piece(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched_outbox, "RIDE_WAIT", 5.0)  # no claim goes alone in this test
    monkeypatch.setattr(sched_outbox, "RIDE_RECENT", 5.0)
    box, session = _outbox()
    wakes = 0
    wait = session.connected.wait

    async def counted() -> bool:  # the sender looks for a scheduler once per wake-up
        nonlocal wakes
        wakes += 1
        return await wait()

    session.connected.wait = counted  # type: ignore[method-assign]
    loop = asyncio.create_task(box.run())
    try:
        assert box.lend(TASK) is None  # its reader is asking
        for i in range(8):  # each after the sender's coalescing wait for the one before
            box.announce(TASK, i, chunk(i), source="peer")
            await asyncio.sleep(2 * ANNOUNCE_COALESCE)
        assert session.sent == [] and wakes == 1
        ann = box.lend(TASK)  # the reader's next call carries all eight
        assert ann is not None and [c.index for c in ann.pieces] == list(range(8))
        box.answered(ann, session.state.announce(ann, time.monotonic()))
        assert session.state.tasks[TASK].pieces[7].holders == {"me"}
    finally:
        loop.cancel()


def test_a_first_copy_waits_less_for_a_ride_than_a_copy_from_a_peer() -> None:
    assert ride_wait("origin") == RIDE_WAIT_ORIGIN < ride_wait("peer") == RIDE_WAIT
    assert ride_ends(10.1, None) is None  # nobody reads the task: nothing waits
    assert ride_ends(10.1, 10.0) == 10.1  # the earliest claim's deadline
    assert ride_ends(99.0, 10.0) == 10.0 + RIDE_RECENT  # no longer than the reader is asking


async def test_a_claim_of_a_piece_from_the_origin_goes_at_once_with_the_copies_waiting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched_outbox, "RIDE_WAIT", 5.0)  # a copy from a peer never goes alone
    monkeypatch.setattr(sched_outbox, "RIDE_RECENT", 5.0)
    box, session = _outbox()
    loop = asyncio.create_task(box.run())
    try:
        assert box.lend(TASK) is None  # its reader is asking
        box.announce(TASK, 0, chunk(0), source="peer")
        await asyncio.sleep(4 * ANNOUNCE_COALESCE)
        assert session.sent == []  # the copy from a peer waits for the reader's next call
        box.announce(TASK, 1, chunk(1), source="origin")  # the first copy: everyone waits
        await until(lambda: _true(len(session.sent) == 1), 5, "the first copy sent at once")
        (path, body), = session.sent
        assert path == "/api/v1/announce" and isinstance(body, Announce)
        assert [c.index for c in body.pieces] == [0, 1]  # the waiting copy goes along
        box.announce(TASK, 2, chunk(2), source="peer")
        await asyncio.sleep(4 * ANNOUNCE_COALESCE)
        assert len(session.sent) == 1  # the next copy from a peer waits again
    finally:
        loop.cancel()
