"""Schedule calls answered in parts (issue 14): a long poll sends each piece as it is decided and
stays parked for the rest, instead of answering at its first decided piece with `wait` for the
others (which its peer then asked again for, in a new call, one call and a re-decision of each
piece left per piece handed out). The pure core; `Waiters` with a sink; a real scheduler and the
peer's own client and batcher over framed calls; a connection dropped between parts; an older
peer, an older framed scheduler and HTTP keeping the one-answer long poll; real peers pulling."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from common import callframes as cf
from common.limits import DEFAULT
from common.models import (
    Announce,
    Decision,
    Heartbeat,
    PeerRegistration,
    PieceClaim,
    RegisterReply,
    ScheduleReply,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
)
from common.pieces import MiB
from common.tasks import TaskSet
from common.web import ClientLimits
from peer.engine.batcher import DecisionBatcher
from peer.sched_framed import FramedTransport
from peer.sched_transport import PARTS, HttpTransport, SchedulerUnavailable
from peer.scheduler_client import SchedulerClient
from scheduler import store
from scheduler.server import SchedulerConfig, SchedulerService
from scheduler.store import Waiters
from scheduler.waiting import Parked, Parking
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    framed_client,
    metric,
    pull_digest,
    push_blob,
    until,
)

SECRET = b"parts-test-secret-0123456789abcdef"
TASK = "sha256:" + "cd" * 32
API = "/api/v1"
REGISTRY = "http://registry.test:5000"


def _d(piece: int, action: str) -> Decision:
    return Decision(piece=piece, action=action, reason="holders-busy" if action == "wait"
                    else None)  # type: ignore[arg-type]


# -- the pure core ----------------------------------------------------------------------------

def test_a_call_in_parts_lets_its_decided_pieces_go_and_stays_parked_for_the_rest() -> None:
    parking = Parking()
    call, other = Parked([1, 2, 3], recheck=0.25), Parked([2, 3], recheck=0.25)
    for c in (call, other):
        parking.park(c)
        c.begin(0.0)
        c.decided([_d(i, "wait") for i in c.pieces])
        assert c.idle()
    assert parking.settle(call, call.answer()) == []  # nothing decided: nothing leaves

    assert parking.announced([2], {2: 2}) == [call, other]
    assert call.begin(0.1) == (2,)
    decided = [_d(2, "parents")]
    call.decided(decided)
    assert [(d.piece, d.action) for d in parking.settle(call, decided)] == [(2, "parents")]
    assert call.pieces == (1, 3)
    assert [d.piece for d in call.answer()] == [1, 3]  # its waits, as last decided
    assert len(parking) == 2  # still parked, in its place: the oldest on pieces 1 and 3

    call.idle()
    assert parking.announced([2], {2: 5}) == []  # piece 2 is not its any more (nor other's:
    assert parking.announced([3], {3: 1}) == [call]  # deciding); the oldest on 3 goes first
    assert call.begin(0.2) == (3,)
    decided = [_d(3, "source")]
    call.decided(decided)
    assert [d.piece for d in parking.settle(call, decided)] == [3] and call.pieces == (1,)
    assert call.begin(0.3 + 0.25) == ()  # no timer in the core: the driver's changed_all
    call.changed_all()
    assert call.begin(0.6) == (1,)  # a full decision is of the pieces left


def test_settling_the_decisions_just_merged_lets_the_same_pieces_go() -> None:
    """The driver settles only what it just decided (`settle(call, decided)`): the same
    pieces, in the same order, as looking at every piece of the call (`_every_piece_ready`,
    the reference)."""
    for decided in ([_d(1, "source"), _d(3, "parents"), _d(4, "wait")], [_d(4, "wait")]):
        parking = Parking()
        call = Parked([1, 3, 4, 5], recheck=0.25)
        parking.park(call)
        call.begin(0.0)
        call.decided([_d(i, "wait") for i in call.pieces])
        call.merge(decided)
        expected = _every_piece_ready(call)
        left = tuple(i for i in call.pieces if i not in {d.piece for d in expected})
        ready = parking.settle(call, decided)
        assert ready == expected and call.pieces == left
        assert [d.piece for d in call.answer()] == list(left)
    assert call.pieces == (1, 3, 4, 5)  # the last round: nothing but a wait, nothing left


def _every_piece_ready(call: Parked) -> list[Decision]:
    """What a call answered in parts lets go, walking every piece it has left."""
    return [d for i in call.pieces if (d := call._last.get(i)) is not None
            and d.action != "wait"]


# -- Waiters with a sink: the long poll's driver -------------------------------------------------

class Rules:
    """A `decide` that answers `source` for the pieces made ready; records what it was asked."""

    def __init__(self) -> None:
        self.ready: set[int] = set()
        self.asked: list[tuple[int, ...]] = []

    async def decide(self, req: ScheduleRequest,
                     pieces: tuple[int, ...] | None = None) -> list[Decision]:
        asked = tuple(req.pieces if pieces is None else pieces)
        self.asked.append(asked)
        return [_d(i, "source" if i in self.ready else "wait") for i in asked]


async def _in_parts(waiters: Waiters, rules: Rules, pieces: list[int], wait_ms: int,
                    parts: list[list[int]]) -> list[Decision]:
    token = store.PARTS.set(lambda ds: parts.append([d.piece for d in ds]))
    try:
        req = ScheduleRequest(peer_id="p", task_id=TASK, pieces=pieces, wait_ms=wait_ms)
        return await waiters.schedule(req, rules.decide)
    finally:
        store.PARTS.reset(token)


async def test_waiters_send_each_decided_piece_and_answer_with_the_last(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "RECHECK_SECONDS", 60.0)  # no periodic re-decide in between
    waiters, rules = Waiters(), Rules()
    rules.ready.add(0)
    parts: list[list[int]] = []
    call = asyncio.create_task(_in_parts(waiters, rules, [0, 1, 2], 5000, parts))
    await until(lambda: _now(parts == [[0]]), 5, "the first part")
    assert not call.done() and waiters.waiting(TASK) == 1
    rules.ready.add(2)
    waiters.notify(TASK, [2], {2: 1})
    await until(lambda: _now(parts == [[0], [2]]), 5, "the second part")
    rules.ready.add(1)
    waiters.notify(TASK, [1], {1: 1})
    answer = await call
    assert [(d.piece, d.action) for d in answer] == [(1, "source")]  # the last, as the answer
    assert parts == [[0], [2]]
    assert rules.asked == [(0, 1, 2), (2,), (1,)]  # each piece decided once after the first
    assert waiters.waiting(TASK) == 0


async def test_waiters_in_parts_answer_the_waits_left_at_the_deadline() -> None:
    waiters, rules = Waiters(), Rules()
    rules.ready.add(1)
    parts: list[list[int]] = []
    answer = await _in_parts(waiters, rules, [0, 1], 50, parts)
    assert parts == [[1]] and [(d.piece, d.action) for d in answer] == [(0, "wait")]
    everything = await _in_parts(waiters, rules, [1], 5000, parts)  # decided at once: no part
    assert parts == [[1]] and [d.action for d in everything] == ["source"]


async def test_without_a_sink_the_long_poll_answers_at_its_first_decided_piece() -> None:
    waiters, rules = Waiters(), Rules()
    rules.ready.add(1)
    answer = await waiters.schedule(ScheduleRequest(peer_id="p", task_id=TASK, pieces=[0, 1],
                                                    wait_ms=5000), rules.decide)
    assert [(d.piece, d.action) for d in answer] == [(0, "wait"), (1, "source")]


# -- a real scheduler, the peer's own client and batcher ----------------------------------------

def _now(value: bool) -> asyncio.Future[bool]:
    f: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    f.set_result(value)
    return f


@pytest.fixture
async def scheduler(request: pytest.FixtureRequest) -> AsyncIterator[SchedulerService]:
    framed = getattr(request, "param", "parts") != "http"
    svc = SchedulerService(SchedulerConfig(listen="127.0.0.1:0", udp=None, secret=SECRET,
                                           framed=framed, heartbeat_interval=5.0,
                                           limits=ClientLimits(header_timeout=1.0)))
    await svc.start()
    if getattr(request, "param", "parts") == "old-scheduler":
        assert svc.framed is not None
        svc.framed.parts = False  # a framed build from before parts: its WELCOME offers none
    yield svc
    await svc.stop()


class _Nothing:
    def tasks(self) -> list:
        return []

    def drop_task(self, task_id: str) -> None:
        pass


class _Clock:
    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


CLAIM = "blake3:" + "0" * 64


async def _a_leases(t: FramedTransport, url: str, pieces: list[int]) -> None:
    """Peer a registered, a 4-piece task, and a holding the origin lease of `pieces`."""
    await t.post(url, f"{API}/peers", PeerRegistration(id="a", upload_addr="127.0.0.1:9"),
                 RegisterReply)
    await t.post(url, f"{API}/tasks",
                 TaskRequest(task_id=TASK, length=4 * MiB, piece_size=MiB), TaskMeta)
    for i in pieces:  # one at a time: each its own run, so each is leased
        lease = await t.post(url, f"{API}/schedule", ScheduleRequest(
            peer_id="a", task_id=TASK, pieces=[i], wait_ms=0), ScheduleReply)
        assert lease is not None and lease.decisions[0].action == "source", lease


async def _announce(t: FramedTransport, url: str, piece: int) -> None:
    await t.post(url, f"{API}/announce", Announce(peer_id="a", task_id=TASK, pieces=[
        PieceClaim(index=piece, chunk=CLAIM)]), None)


async def _schedule_calls(url: str) -> float:
    try:
        return await metric(url, "naiad_scheduler_framed_calls_total", {"route": "schedule"})
    except KeyError:
        return 0.0


async def _parts(url: str) -> float:
    try:
        return await metric(url, "naiad_scheduler_schedule_parts_total")
    except KeyError:
        return 0.0


class _B:
    """Peer b: the peer's own SchedulerClient and the engine's batcher, over `transport`."""

    def __init__(self, url: str, http: aiohttp.ClientSession,
                 transport: FramedTransport) -> None:
        self.client = SchedulerClient([url], PeerRegistration(id="b", upload_addr="127.0.0.1:8"),
                                      http, _Nothing(), Heartbeat, SECRET,  # type: ignore[arg-type]
                                      transport=transport)
        self.tasks = TaskSet("test-b")
        self.batcher = DecisionBatcher(self.client, TASK, self.tasks, lambda _: DEFAULT,
                                       lambda: REGISTRY, _Clock())

    async def start(self) -> None:
        await self.client.start()
        await asyncio.wait_for(self.client.connected.wait(), 10)

    async def stop(self) -> None:
        await self.tasks.close()
        await self.client.stop()


async def test_a_long_poll_answers_each_piece_as_it_is_decided_in_one_call(
        scheduler: SchedulerService) -> None:
    url = scheduler.url
    async with framed_client(SECRET) as (http, t):
        b = _B(url, http, FramedTransport(HttpTransport(http, SECRET), SECRET))
        try:
            await _a_leases(t, url, [0, 1, 2])
            await b.start()
            before = await _schedule_calls(url)
            asked = [b.batcher.decide(i, frozenset()) for i in (0, 1, 2)]
            await until(lambda: _now(scheduler.store.waiters.waiting(TASK) == 1), 5,
                        "b's call parked on a's leases")
            await _announce(t, url, 1)
            d1 = await asyncio.wait_for(asked[1], 5)
            assert d1.action == "parents" and [p.id for p in d1.parents] == ["a"]
            assert not asked[0].done() and not asked[2].done()
            assert scheduler.store.waiters.waiting(TASK) == 1  # the same call, parked on
            for i in (2, 0):
                await _announce(t, url, i)
                d = await asyncio.wait_for(asked[i], 5)
                assert (d.piece, d.action) == (i, "parents")
            # One call for the three, two parts and the final answer: nothing asked again.
            assert await _schedule_calls(url) - before == 1
            assert await _parts(url) == 2
        finally:
            await b.stop()


async def test_a_connection_dropped_between_parts_fails_only_the_pieces_still_asked(
        scheduler: SchedulerService) -> None:
    url = scheduler.url
    async with framed_client(SECRET) as (http, t):
        b = _B(url, http, FramedTransport(HttpTransport(http, SECRET), SECRET))
        try:
            await _a_leases(t, url, [0, 1])
            await b.start()
            asked = [b.batcher.decide(i, frozenset()) for i in (0, 1)]
            await until(lambda: _now(scheduler.store.waiters.waiting(TASK) == 1), 5,
                        "b's call parked")
            await _announce(t, url, 0)
            assert (await asyncio.wait_for(asked[0], 5)).action == "parents"
            assert scheduler.framed is not None
            for c in list(scheduler.framed.connections):  # b's (and t's) connection drops
                c.abort()
            with pytest.raises(SchedulerUnavailable, match="connection lost") as e:
                await asyncio.wait_for(asked[1], 5)
            assert e.value.unusable  # as a broken connection: the session fails over
            assert asked[0].result().action == "parents"  # what a part answered stands
        finally:
            await b.stop()


@pytest.mark.parametrize("scheduler", ["old-peer", "old-scheduler", "http"], indirect=True)
async def test_older_peers_schedulers_and_http_keep_the_one_answer_long_poll(
        scheduler: SchedulerService, request: pytest.FixtureRequest) -> None:
    """A peer that asks for no parts (one from before), a framed scheduler that offers none and
    a scheduler with framing off (HTTP) each answer at the first decided piece, with `wait`
    for the others, which the batcher asks again for in a new call."""
    url = scheduler.url
    side = request.node.callspec.params["scheduler"]
    async with framed_client(SECRET) as (http, t):
        bt = FramedTransport(HttpTransport(http, SECRET), SECRET, parts=side != "old-peer")
        b = _B(url, http, bt)
        try:
            await _a_leases(t, url, [0, 1])
            await b.start()
            parts: list[list[Decision]] = []
            call = asyncio.create_task(b.client.schedule(TASK, [0, 1], set(), 5000, REGISTRY,
                                                         part=parts.append))
            await until(lambda: _now(scheduler.store.waiters.waiting(TASK) == 1), 5,
                        "b's call parked")
            await _announce(t, url, 1)
            answer = await asyncio.wait_for(call, 5)
            assert [(d.piece, d.action) for d in answer] == [(0, "wait"), (1, "parents")]
            assert parts == []
            assert await _parts(url) == 0
            assert (bt.framed > 0) == (side != "http")
        finally:
            await b.stop()


async def test_a_part_the_caller_cannot_parse_fails_that_call_not_the_connection(
        scheduler: SchedulerService) -> None:
    url = scheduler.url
    async with framed_client(SECRET) as (_http, t):
        await _a_leases(t, url, [0])
        await t.post(url, f"{API}/peers", PeerRegistration(id="c", upload_addr="127.0.0.1:7"),
                     RegisterReply)
        seen: list[object] = []

        def refuse(part: object) -> None:
            seen.append(part)
            raise ValueError("not taken")
        token = PARTS.set(refuse)
        try:
            call = asyncio.create_task(t.post(url, f"{API}/schedule", ScheduleRequest(
                peer_id="c", task_id=TASK, pieces=[0, 2], wait_ms=5000), ScheduleReply,
                10))
        finally:
            PARTS.reset(token)
        with pytest.raises(ValueError, match="not taken"):  # 2 is c's lease: a part
            await asyncio.wait_for(call, 5)
        assert len(seen) == 1 and isinstance(seen[0], ScheduleReply)
        assert [d.piece for d in seen[0].decisions] == [2]
        answered = t.framed
        again = await t.post(url, f"{API}/schedule", ScheduleRequest(
            peer_id="a", task_id=TASK, pieces=[3], wait_ms=0), ScheduleReply)
        assert again is not None and t.framed == answered + 1  # the connection carries on
        assert scheduler.framed is not None and len(scheduler.framed.connections) == 1


def test_the_parts_flag_rides_bytes_older_builds_skip() -> None:
    """An older build packs the flags byte as padding and skips it: a CALL, a WELCOME and a
    REPLY with the flag read there as without it, and this build reads their zero as none."""
    old = __import__("struct").Struct("!BxHII")
    welcome = cf.welcome(7, parts=True)
    assert old.unpack(welcome[:old.size]) == (cf.WELCOME, 0, 0, 8)
    [f] = cf.Reader().feed(welcome)
    assert f.flags == cf.PARTS and cf.parse_welcome(f.body) == (7, cf.MAX_BODY)
    [c] = cf.Reader(kinds=cf.TO_SCHEDULER).feed(cf.call(3, f"{API}/schedule", None, None,
                                                        b"{}", parts=True))
    assert cf.parse_call(c).parts and not cf.parse_call(
        cf.Reader(kinds=cf.TO_SCHEDULER).feed(cf.call(3, f"{API}/schedule", None, None,
                                                      b"{}"))[0]).parts
    [r] = cf.Reader(kinds=cf.TO_PEER).feed(cf.reply(3, 200, b"{}", more=True)
                                           + cf.reply(3, 200, b"{}"))[:1]
    assert r.flags == cf.PARTS


# -- real peers pulling ----------------------------------------------------------------------

async def test_real_peers_pull_exact_bytes_with_answers_in_parts(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(12 * MiB + 5)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peers = [await cluster.peer(name, sched.url, origin.url) for name in ("a", "b", "c")]
    pulls = [pull_digest(f"{p.url}/v2/{repo}/blobs/{digest}") for p in peers]
    assert await asyncio.gather(*pulls) == [digest] * 3  # pull_digest checks the digest
    assert origin.bytes_down < 2 * len(blob)  # the others were sent to whoever had it
    # Whether any answer came in parts depends on how the claims were coalesced (one
    # announcement of every piece decides a waiting call at once): the tests above pin it.
    assert await _schedule_calls(sched.url) >= 3
    assert "Traceback" not in "".join(p.proc.logs() for p in peers)
