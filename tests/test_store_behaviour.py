"""One behaviour suite for every state store: `MemoryStore`, and `RedisStore` over a real
redis-server started here. Then what only Redis promises: several stores (replicas) over one
Redis behave as one.

Time is an injected clock wherever the rules read it (leases, penalties); only Redis key expiry
runs on real time, and the tests that need it use a short heartbeat interval and poll, bounded.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

import scheduler.state
import scheduler.store as store_module
from common.models import (
    Announce,
    Decision,
    Heartbeat,
    LeaseProgress,
    PeerCounters,
    PeerLoad,
    PeerRegistration,
    PieceClaim,
    Report,
    ScheduleRequest,
    TaskRequest,
    Withdraw,
)
from common.pieces import MiB
from scheduler.redis.loader import VERSIONED
from scheduler.redis_store import NotLoaded, Partial, RedisStore
from scheduler.state import (
    HOLDER_SAMPLE,
    PENALTY_SECONDS,
    Conflict,
    StateError,
    UnknownPeer,
    UnknownTask,
)
from scheduler.store import MemoryStore, Store
from tests.cluster import until
from tests.redis_servers import RedisCluster, RedisServer, redis_cluster, redis_server
from tests.test_state import one_child, two_children

# The session's fixtures, and shares of one and two children per holder (tests counting places).
__all__ = ["one_child", "redis_cluster", "redis_server", "two_children"]

TASK = "sha256:" + "a" * 64
OTHER = "sha256:" + "c" * 64
URL_TASK = "url:" + "b" * 64
HB = 2.0
LEASE = 2.0


def chunk(n: int) -> str:
    return f"blake3:{n:064x}"


async def _backend(request: pytest.FixtureRequest, kind: str) -> str | None:
    """An emptied Redis (or Redis Cluster) for `kind`, and its URL; None: the memory store."""
    if kind == "memory":
        return None
    if kind == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        await cluster.flush()
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    await _flush(server.url)
    return server.url


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Harness:
    """A store under test, its clock, and (Redis) more stores over the same state."""

    def __init__(self, kind: str, clock: Clock, url: str | None) -> None:
        self.kind = kind
        self.clock = clock
        self.url = url
        self.stores: list[Store] = []
        self.n = 0

    async def new_store(self, heartbeat_interval: float = HB, clock: Clock | None = None
                        ) -> Store:
        clock = clock or self.clock
        if self.kind == "memory":
            s: Store = MemoryStore(heartbeat_interval=heartbeat_interval, lease_timeout=LEASE,
                                   clock=clock)
        else:
            assert self.url is not None
            s = RedisStore.from_url(self.url, cluster=self.kind == "redis-cluster",
                                    heartbeat_interval=heartbeat_interval,
                                    lease_timeout=LEASE, clock=clock,
                                    rng=random.Random(len(self.stores)))
        await s.start()
        if isinstance(s, RedisStore):
            await asyncio.wait_for(s.subscribed.wait(), 10)
        self.stores.append(s)
        return s

    @property
    def store(self) -> Store:
        return self.stores[0]

    async def close(self) -> None:
        for s in self.stores:
            await s.close()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    harness = Harness(request.param, Clock(), await _backend(request, request.param))
    await harness.new_store()
    yield harness
    await harness.close()


@pytest.fixture(params=["redis", "redis-cluster"])
async def redis_h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """For what only Redis promises."""
    harness = Harness(request.param, Clock(), await _backend(request, request.param))
    await harness.new_store()
    yield harness
    await harness.close()


async def _flush(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()


@pytest.fixture(params=["redis", "redis-cluster"])
async def two(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two replicas' stores over one Redis (or one Redis Cluster), one clock."""
    harness = Harness(request.param, Clock(), await _backend(request, request.param))
    a = await harness.new_store()
    b = await harness.new_store()
    assert isinstance(a, RedisStore) and isinstance(b, RedisStore)
    yield a, b
    await harness.close()


# -- helpers -----------------------------------------------------------------------------------

_addr = iter(range(1, 1 << 20))


async def peer(s: Store, pid: str, **kw: object) -> None:
    n = next(_addr)
    kw.setdefault("upload_addr", f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}:65002")
    await s.register(PeerRegistration(id=pid, **kw))


async def task(s: Store, pieces: int = 8, task_id: str = TASK) -> None:
    await s.ensure_task(TaskRequest(task_id=task_id, length=pieces * MiB, piece_size=MiB))


async def setup(s: Store, *pids: str, pieces: int = 8) -> None:
    for pid in pids or ("A", "B", "C", "D"):
        await peer(s, pid)
    await task(s, pieces)


async def announce(s: Store, pid: str, pieces: dict[int, str] | list[int] | range, *,
                   sealed: bool = False, progress: tuple[int, ...] = (), task_id: str = TASK,
                   registry: str | None = None):
    claims = pieces.items() if isinstance(pieces, dict) else ((i, chunk(i)) for i in pieces)
    return await s.announce(Announce(
        peer_id=pid, task_id=task_id, sealed=sealed, registry=registry,
        pieces=[PieceClaim(index=i, chunk=c) for i, c in claims],
        progress=[LeaseProgress(epoch=e) for e in progress]))


async def schedule(s: Store, pid: str, pieces: list[int] | range, *, wait_ms: int = 0,
                   exclude: tuple[str, ...] = (), task_id: str = TASK,
                   registry: str | None = None) -> list[Decision]:
    return await s.schedule(ScheduleRequest(peer_id=pid, task_id=task_id, pieces=list(pieces),
                                            exclude=list(exclude), wait_ms=wait_ms,
                                            registry=registry))


async def one(s: Store, pid: str, piece: int, **kw: object) -> Decision:
    (d,) = await schedule(s, pid, [piece], **kw)
    return d


async def parents(s: Store, pid: str, piece: int, **kw: object) -> list[str]:
    d = await one(s, pid, piece, **kw)
    return [p.id for p in d.parents] if d.action == "parents" else []


async def holders(s: Store, piece: int, task_id: str = TASK) -> list[str]:
    view = await s.task(task_id)
    assert view is not None
    for p in view["piece_map"]:
        if p["index"] == piece:
            return p["holders"]
    return []


async def heartbeat(s: Store, pid: str, started_at: float = 1.0, active: int = 0,
                    **counters: int) -> None:
    await s.heartbeat(pid, Heartbeat(load=PeerLoad(active_uploads=active),
                                     counters=PeerCounters(started_at=started_at, **counters)))


@pytest.fixture
def no_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Long polls re-decide only when woken: a missed wake-up fails the test."""
    monkeypatch.setattr(store_module, "RECHECK_SECONDS", 60.0)


# -- peers -------------------------------------------------------------------------------------

async def test_register_and_heartbeat(h: Harness) -> None:
    s = h.store
    await peer(s, "A", idc="i1", location="a|b", upload_slots=3, seed=True)
    view = await s.peer("A")
    assert view is not None
    assert (view["idc"], view["location"], view["upload_slots"], view["seed"]) == \
        ("i1", "a|b", 3, True)
    assert view["cordoned"] is False and view["penalised"] is False
    assert view["registered_at"] == h.clock()
    h.clock.advance(1.5)
    await heartbeat(s, "A", active=5)
    view = await s.peer("A")
    assert view["load"]["active_uploads"] == 5
    assert view["last_heartbeat_age"] == 0.0
    assert [p["id"] for p in await s.peers()] == ["A"]
    with pytest.raises(UnknownPeer):
        await heartbeat(s, "nobody")
    assert await s.peer("nobody") is None


async def test_reregistration_keeps_holdings_and_updates_address(h: Harness) -> None:
    s = h.store
    await setup(s)
    await announce(s, "A", [0])
    await s.register(PeerRegistration(id="A", upload_addr="192.168.1.9:7000", idc="new"))
    d = await one(s, "B", 0)
    assert d.action == "parents"
    assert [(p.id, p.addr) for p in d.parents] == [("A", "192.168.1.9:7000")]
    assert (await s.peer("A"))["idc"] == "new"


async def test_a_new_process_of_a_peer_replaces_its_holdings(h: Harness) -> None:
    """A peer that restarted may have dropped chunks at start-up: its registration (a new
    process start time) forgets what the old process held, and its re-announcement says what
    it holds now. The same process registering again (failing over) keeps them."""
    s = h.store
    await setup(s)
    await s.ensure_task(TaskRequest(task_id=OTHER, length=4 * MiB, piece_size=MiB))
    reg = PeerRegistration(id="A", upload_addr="10.9.9.9:65002", started_at=100.0)
    await s.register(reg)
    await announce(s, "A", [0, 1, 2])
    await announce(s, "A", [0], task_id=OTHER)
    await s.register(reg)  # the same process again
    assert await holders(s, 1) == ["A"]
    h.clock.advance(1.0)
    await s.register(reg.model_copy(update={"started_at": 200.0}))
    for i in (0, 1, 2):
        assert await holders(s, i) == []
    assert await holders(s, 0, task_id=OTHER) == []
    assert (await one(s, "B", 1)).action == "source"
    assert (await s.peer("A"))["registered_at"] == h.clock()
    # What it re-announces is all it holds; its old holdings do not come back with it.
    await announce(s, "A", [2])
    assert await holders(s, 2) == ["A"] and await holders(s, 1) == []
    await s.leave("A")
    assert await holders(s, 2) == []


async def test_leave_drops_holdings_and_frees_leases(h: Harness) -> None:
    s = h.store
    await setup(s)
    await announce(s, "A", [0, 1])
    lease = await one(s, "A", 5)
    assert lease.action == "source"
    await s.leave("A")
    assert await s.peer("A") is None
    assert await holders(s, 0) == []
    assert (await one(s, "B", 0)).action == "source"
    taken = await one(s, "B", 5)
    assert taken.action == "source" and taken.epoch > lease.epoch
    with pytest.raises(UnknownPeer):
        await s.leave("A")


async def test_silent_peer_expires_and_its_pieces_stop_being_handed_out(h: Harness) -> None:
    """Three missed heartbeats: gone. Memory expires by its clock; Redis keys by real time
    (a 0.25 s interval here), so the loop polls, keeping B alive, until A is swept."""
    s = await h.new_store(heartbeat_interval=0.25)
    await setup(s, "A", "B")
    await announce(s, "A", [0])
    assert await parents(s, "B", 0) == ["A"]
    gone: list[str] = []

    async def a_swept() -> bool:
        h.clock.advance(0.05)
        await heartbeat(s, "B")
        gone.extend(await s.expire())
        return "A" in gone

    await until(a_swept, seconds=10, what="A expired")
    assert gone == ["A"]
    assert [p["id"] for p in await s.peers()] == ["B"]
    assert await s.peer("A") is None
    assert await holders(s, 0) == []
    d = await one(s, "B", 0)
    assert d.action == "source"
    # It may come back, as a new peer without its old holdings.
    await peer(s, "A")
    assert await holders(s, 0) == []


# -- tasks and announcements -------------------------------------------------------------------

async def test_ensure_task_fixes_layout_and_refuses_another_length(h: Harness) -> None:
    s = h.store
    meta = await s.ensure_task(TaskRequest(task_id=TASK, length=3 << 30))
    assert meta.piece_size == 4 * MiB and meta.digest == TASK and not meta.sealed
    again = await s.ensure_task(TaskRequest(task_id=TASK, length=3 << 30, piece_size=64 << 10))
    assert again == meta
    with pytest.raises(Conflict):
        await s.ensure_task(TaskRequest(task_id=TASK, length=5))
    url = await s.ensure_task(TaskRequest(task_id=URL_TASK, length=10, piece_size=64 << 10))
    assert url.piece_size == 64 << 10 and url.digest is None
    assert sorted(t["task_id"] for t in await s.tasks()) == [TASK, URL_TASK]
    assert await s.task(OTHER) is None


async def test_announce_records_holders(h: Harness) -> None:
    s = h.store
    await setup(s)
    reply = await announce(s, "A", [0, 1, 2])
    assert (reply.accepted, reply.rejected) == (3, [])
    await announce(s, "B", [1])
    await announce(s, "B", [1])  # twice counts once
    assert await holders(s, 1) == ["A", "B"]
    view = await s.task(TASK)
    assert view["pieces_known"] == 3 and view["holders"] == 2
    assert view["piece_map"][0]["chunk"] == chunk(0)
    assert (await s.peer("A"))["tasks"] == 1
    with pytest.raises(UnknownPeer):
        await announce(s, "nobody", [0])
    with pytest.raises(UnknownTask):
        await announce(s, "A", [0], task_id=URL_TASK)


async def test_conflicting_claim_is_rejected_and_its_maker_penalised(h: Harness) -> None:
    s = h.store
    await setup(s)
    await announce(s, "A", {0: chunk(100)})
    reply = await announce(s, "B", {0: chunk(999), 1: chunk(1), 9: chunk(9)})
    assert reply.rejected == [0, 9] and reply.accepted == 1
    assert await holders(s, 0) == ["A"]
    b = await s.peer("B")
    assert b["penalised"] is True and b["penalty_reason"] == "conflict"
    assert (await one(s, "C", 1)).action == "source"  # a flagged peer is not handed out
    h.clock.advance(PENALTY_SECONDS["conflict"])
    assert await parents(s, "C", 1) == ["B"]


async def test_sealing_takes_two_confirmations(h: Harness) -> None:
    s = h.store
    await setup(s)
    await announce(s, "A", range(8))  # the honest provisional map
    # A forged seal: chunk ids of its own choosing, "sealed", from one member.
    reply = await announce(s, "D", {i: chunk(500 + i) for i in range(8)}, sealed=True)
    assert sorted(reply.rejected) == list(range(8))
    d = await s.peer("D")
    assert d["penalised"] is True and d["penalty_reason"] == "conflict"
    view = await s.task(TASK)
    assert view["sealed"] is False and view["piece_map"][0]["chunk"] == chunk(0)
    assert await holders(s, 0) == ["A"]
    reply = await announce(s, "B", range(8), sealed=True)  # one confirmation: not yet
    assert reply.rejected == [] and (await s.task(TASK))["sealed"] is False
    await announce(s, "B", [], sealed=True)  # the same peer again is not a second
    assert (await s.task(TASK))["sealed"] is False
    await announce(s, "A", [], sealed=True)
    view = await s.task(TASK)
    assert view["sealed"] is True and view["complete_holders"] == 2
    # Once sealed, a conflicting claim is refused even with a seal of its own.
    reply = await announce(s, "C", {0: chunk(777)}, sealed=True)
    assert reply.rejected == [0]
    assert (await s.peer("C"))["penalised"] is True


async def test_blob_mismatch_resets_a_sealed_map_rate_limited(h: Harness) -> None:
    s = h.store
    await setup(s)
    forged = {i: chunk(900 + i) for i in range(8)}
    await announce(s, "A", forged, sealed=True)  # two colluders confirm each other
    await announce(s, "B", forged, sealed=True)
    assert (await s.task(TASK))["sealed"] is True
    await s.blob_mismatch("C", TASK)
    view = await s.task(TASK)
    assert view["sealed"] is False and view["piece_map"] == [] and view["holders"] == 0
    a = await s.peer("A")
    assert a["penalised"] is True and a["penalty_reason"] == "mismatch"  # the author
    assert (await s.peer("B"))["penalised"] is False  # it only agreed
    assert (await one(s, "D", 0)).action == "source"
    # The same reporter again within the minute changes nothing; another reporter may.
    await announce(s, "D", range(8))
    h.clock.advance(30)
    await s.blob_mismatch("C", TASK)
    assert await holders(s, 0) == ["D"]
    await s.blob_mismatch("B", TASK)
    assert await holders(s, 0) == []
    await announce(s, "D", range(8))
    h.clock.advance(31)
    await s.blob_mismatch("C", TASK)
    assert await holders(s, 0) == []
    with pytest.raises(UnknownTask):
        await s.blob_mismatch("A", URL_TASK)


async def test_a_provisional_map_is_bound_to_its_registry(h: Harness) -> None:
    s = h.store
    await setup(s)
    reg_a, reg_b = "https://a.example", "http://b.example:5000"
    assert {d.action for d in await schedule(s, "A", range(8), registry=reg_a)} == {"source"}
    await announce(s, "A", range(8), registry=reg_a)
    # Another registry's requester reads its own origin: no lease, no chunk ids, no holders.
    ds = await schedule(s, "B", range(8), registry=reg_b)
    assert {(d.action, d.epoch, d.chunk, d.reason) for d in ds} == \
        {("source", None, None, "other-registry")}
    assert await parents(s, "C", 0, registry=reg_a) == ["A"]
    # Its claims: agreeing ones make it a holder, differing ones are not blamed.
    reply = await announce(s, "B", {0: chunk(0), 1: chunk(111)}, registry=reg_b)
    assert reply.accepted == 1 and reply.rejected == [] and reply.deferred == [1]
    assert (await s.peer("B"))["penalised"] is False
    assert sorted(await holders(s, 0)) == ["A", "B"]
    # Its registry's mismatch says nothing about this map.
    await s.blob_mismatch("B", TASK, reg_b)
    assert sorted(await holders(s, 0)) == ["A", "B"]
    # Two confirmations seal it, and a sealed map is for every registry.
    await announce(s, "A", [], sealed=True, registry=reg_a)
    await announce(s, "D", range(8), sealed=True, registry=reg_a)
    assert (await s.task(TASK))["sealed"] is True
    assert (await one(s, "B", 1, registry=reg_b)).action == "parents"


async def test_a_map_nobody_holds_is_bound_again(h: Harness) -> None:
    s = h.store
    await setup(s)
    reg_a, reg_b = "https://a.example", "https://b.example"
    await schedule(s, "A", [0], registry=reg_a)
    await announce(s, "A", {0: chunk(999)}, registry=reg_a)
    await s.leave("A")
    d = await one(s, "B", 0, registry=reg_b)
    assert d.action == "source" and d.epoch is not None
    assert (await announce(s, "B", {0: chunk(0)}, registry=reg_b)).rejected == []
    assert await parents(s, "C", 0, registry=reg_b) == ["B"]


async def test_blob_mismatch_clears_a_provisional_map(h: Harness) -> None:
    s = h.store
    await setup(s)
    await schedule(s, "A", range(4))
    await announce(s, "A", range(4))
    await schedule(s, "B", range(4, 8))
    await s.blob_mismatch("C", TASK)
    view = await s.task(TASK)
    assert view["piece_map"] == [] and view["leases"] == [] and view["holders"] == 0
    ds = await schedule(s, "D", range(8))
    assert {d.action for d in ds} == {"source"} and {d.reason for d in ds} == {"new-task"}
    assert (await announce(s, "D", {0: chunk(4242)})).rejected == []


@pytest.mark.usefixtures("two_children")
async def test_withdrawn_pieces_stop_being_handed_out(h: Harness) -> None:
    s = h.store
    await setup(s)
    await schedule(s, "A", range(8))
    await announce(s, "A", range(8), sealed=True)
    await announce(s, "B", [0, 1])
    assert sorted(await holders(s, 0)) == ["A", "B"]
    assert (await s.task(TASK))["complete_holders"] == 1

    await s.withdraw(Withdraw(peer_id="A", task_id=TASK, pieces=[0, 7]))
    assert await holders(s, 0) == ["B"] and await holders(s, 7) == []
    assert await parents(s, "C", 0) == ["B"]
    assert await parents(s, "C", 1) != [] and "A" in await parents(s, "C", 3)
    view = await s.task(TASK)
    assert view["complete_holders"] == 0

    await s.withdraw(Withdraw(peer_id="A", task_id=TASK, pieces=None))  # the whole task
    assert all("A" not in p["holders"] for p in (await s.task(TASK))["piece_map"])
    assert await parents(s, "D", 1) == ["B"]
    assert await holders(s, 0) == ["B"]  # another peer's holdings untouched
    await announce(s, "A", [3])  # fetched again: held again
    assert await holders(s, 3) == ["A"]

    # Idempotent, and unknown tasks or pieces are nothing to do; unknown peers register first.
    await s.withdraw(Withdraw(peer_id="A", task_id=TASK, pieces=[0, 0, 6]))
    await s.withdraw(Withdraw(peer_id="A", task_id=OTHER, pieces=None))
    assert await holders(s, 3) == ["A"]
    with pytest.raises(UnknownPeer):
        await s.withdraw(Withdraw(peer_id="nobody", task_id=TASK, pieces=None))


@pytest.mark.usefixtures("one_child")
async def test_one_child_in_flight_per_holder_the_holders_double(h: Harness) -> None:
    """CHILDREN_PER_HOLDER = 1, in every store: a holder's one child fetches at its whole
    uplink; once it holds the piece the two holders take two children."""
    s = h.store
    await setup(s, "H", "A", "B", "C", "D")
    await schedule(s, "H", [0])
    await announce(s, "H", [0])
    assert await parents(s, "A", 0) == ["H"]
    d = await one(s, "B", 0)
    assert (d.action, d.reason) == ("wait", "holders-busy")
    await announce(s, "A", [0])
    assert await parents(s, "B", 0) and await parents(s, "C", 0)
    d = await one(s, "D", 0)
    assert (d.action, d.reason) == ("wait", "holders-busy")
    assert await s.back_to_source() == 1  # H's lease only


@pytest.mark.usefixtures("two_children")
async def test_children_in_flight_are_capped_per_holder(h: Harness) -> None:
    s = h.store
    await setup(s, "H", "A", "B", "C")
    await schedule(s, "H", [0])
    await announce(s, "H", [0])
    assert await parents(s, "A", 0) == ["H"]
    assert await parents(s, "B", 0) == ["H"]
    d = await one(s, "C", 0)
    assert (d.action, d.reason) == ("wait", "holders-busy")
    assert await s.back_to_source() == 1  # H's lease only: a busy piece is never re-sourced
    assert await parents(s, "A", 0) == ["H"]  # a child asking again keeps its place
    await announce(s, "A", [0])
    assert sorted(await parents(s, "C", 0)) == ["A", "H"]
    # Children that never finish stop counting after a lease timeout.
    await peer(s, "D")
    assert (await one(s, "D", 0)).action == "parents"
    await peer(s, "E")
    assert (await one(s, "E", 0)).action == "parents"
    await peer(s, "F")
    assert (await one(s, "F", 0)).action == "wait"
    h.clock.advance(LEASE + 0.01)
    for pid in ("H", "A"):
        await heartbeat(s, pid)
    assert (await one(s, "F", 0)).action == "parents"


# -- leases ------------------------------------------------------------------------------------

async def test_lease_single_flight(h: Harness) -> None:
    s = h.store
    await setup(s)
    a, b = await asyncio.gather(schedule(s, "A", range(4)), schedule(s, "B", range(4)))
    actions = sorted({d.action for d in a} | {"/"} | {d.action for d in b})
    assert actions == ["/", "source", "wait"], (a, b)
    winner = a if a[0].action == "source" else b
    assert {(d.first, d.last) for d in winner} == {(0, 3)}
    assert {d.reason for d in winner} == {"new-task"}
    assert await s.back_to_source() == 1


async def test_lease_runs_and_their_holder(h: Harness) -> None:
    s = h.store
    await setup(s, "A", "B", pieces=40)
    ds = await schedule(s, "A", range(40))
    assert sorted({(d.first, d.last) for d in ds}) == [(0, 15), (16, 31), (32, 39)]
    again = await schedule(s, "A", [1, 2])
    assert {d.reason for d in again} == {"lease"} and {d.epoch for d in again} == {ds[0].epoch}
    partial = await schedule(s, "B", [14, 15])
    assert [d.action for d in partial] == ["wait", "wait"]
    assert await s.back_to_source() == 3
    with pytest.raises(StateError):
        await schedule(s, "B", [0, 40])


async def test_lease_taken_over_after_the_timeout_with_a_higher_epoch(h: Harness) -> None:
    s = h.store
    await setup(s)
    first = await schedule(s, "A", range(4))
    await announce(s, "C", {7: chunk(7)})  # not cold
    h.clock.advance(LEASE - 0.01)
    assert (await one(s, "B", 1)).action == "wait"
    h.clock.advance(0.02)
    ds = await schedule(s, "B", range(4))
    assert [d.action for d in ds] == ["source"] * 4
    assert {d.reason for d in ds} == {"lease-expired"}
    assert ds[0].epoch > first[0].epoch
    assert (await one(s, "A", 0)).action == "wait"  # the old holder now waits


async def test_progress_renews_a_lease(h: Harness) -> None:
    s = h.store
    await setup(s)
    (d,) = await schedule(s, "A", [0])
    for _ in range(3):
        h.clock.advance(1.5)
        await announce(s, "A", [], progress=(d.epoch,))
    assert (await one(s, "B", 0)).action == "wait"
    # progress for another epoch, or from another peer, does not count
    h.clock.advance(1.5)
    await announce(s, "A", [], progress=(d.epoch + 100,))
    await announce(s, "B", [], progress=(d.epoch,))
    h.clock.advance(LEASE - 1.5 + 0.01)
    taken = await one(s, "B", 0)
    assert taken.action == "source" and taken.epoch > d.epoch


async def test_lease_holder_sets_the_provisional_chunk(h: Harness) -> None:
    s = h.store
    await setup(s)
    assert (await one(s, "A", 0)).action == "source"
    deferred = await announce(s, "B", {0: chunk(666)})  # B never fetched it under a lease
    assert deferred.deferred == [0] and deferred.rejected == [] and deferred.accepted == 0
    assert (await s.peer("B"))["penalised"] is False  # deferred, not blamed
    reply = await announce(s, "A", {0: chunk(0)})
    assert reply.rejected == []
    assert (await s.task(TASK))["piece_map"][0]["chunk"] == chunk(0)
    assert await parents(s, "B", 0) == ["A"]


# -- reports, cordon ---------------------------------------------------------------------------

@pytest.mark.usefixtures("two_children")
@pytest.mark.parametrize("kind", ["failed", "slow", "corrupt"])
async def test_reports_penalise_the_parent(h: Harness, kind: str) -> None:
    s = h.store
    await setup(s)
    await announce(s, "A", [0, 1])
    await announce(s, "B", [0, 1])
    await s.report(Report(peer_id="C", parent_id="A", task_id=TASK, piece=0, kind=kind))
    a = await s.peer("A")
    assert a["penalised"] is True and a["penalty_reason"] == kind
    for pid in ("C", "D"):
        assert await parents(s, pid, 1) == ["B"]
    assert await holders(s, 0) == (["B"] if kind == "corrupt" else ["A", "B"])
    h.clock.advance(PENALTY_SECONDS[kind])
    assert "A" in await parents(s, "D", 1)
    with pytest.raises(UnknownPeer):
        await s.report(Report(peer_id="nobody", parent_id="A", task_id=TASK, kind=kind))


async def test_a_shorter_penalty_does_not_cut_a_longer_one(h: Harness) -> None:
    s = h.store
    await setup(s)
    await announce(s, "A", [0])
    await s.report(Report(peer_id="B", parent_id="A", task_id=TASK, kind="corrupt"))
    h.clock.advance(1.0)
    await s.report(Report(peer_id="B", parent_id="A", task_id=TASK, kind="failed"))
    h.clock.advance(PENALTY_SECONDS["failed"])
    assert await parents(s, "C", 0) == []


async def test_cordon_and_uncordon(h: Harness) -> None:
    s = h.store
    await setup(s)
    await announce(s, "A", [0])
    await s.cordon("A")
    assert (await s.peer("A"))["cordoned"] is True
    d = await one(s, "B", 0)
    assert d.action == "source" and d.reason == "parents-unusable"
    await peer(s, "A")  # survives re-registration
    assert (await s.peer("A"))["cordoned"] is True
    await s.uncordon("A")
    assert (await s.peer("A"))["cordoned"] is False
    assert await parents(s, "C", 0) == ["A"]
    await s.cordon("later")  # before it ever registered
    await peer(s, "later")
    assert (await s.peer("later"))["cordoned"] is True
    with pytest.raises(UnknownPeer):
        await s.uncordon("nobody")


# -- counters ----------------------------------------------------------------------------------

async def test_counters_never_go_backwards_nor_count_twice(h: Harness) -> None:
    s = h.store
    await setup(s, "A", "B")
    await heartbeat(s, "A", started_at=1.0, origin=100, served=400)
    await heartbeat(s, "B", started_at=1.0, peer=300, local=50, served=100, uploaded=7)
    assert await s.counters() == {"origin": 100, "peer": 300, "local": 50, "served": 500,
                                  "uploaded": 7}
    await heartbeat(s, "A", started_at=1.0, origin=150, served=500)  # cumulative
    await heartbeat(s, "A", started_at=1.0, origin=120, served=450)  # reordered: adds nothing
    assert (await s.counters())["origin"] == 150
    await peer(s, "A")  # A restarts ...
    await heartbeat(s, "A", started_at=2.0, origin=5, served=5)  # ... and counts from zero
    assert (await s.counters())["origin"] == 155
    await heartbeat(s, "A", started_at=1.0, origin=999)  # late, from the old process
    assert (await s.counters())["origin"] == 155
    await s.leave("A")
    assert (await s.counters())["origin"] == 155
    await peer(s, "A")
    await heartbeat(s, "A", started_at=2.0, origin=5, served=5)  # same process: not again
    assert (await s.counters())["origin"] == 155
    assert (await s.counters())["served"] == 605


async def test_counters_and_state_survive_a_scheduler_restart(redis_h: Harness) -> None:
    """Redis only: in-memory state dies with its process by design."""
    h = redis_h
    s = h.store
    await setup(s)
    await heartbeat(s, "A", origin=100, served=300)
    await announce(s, "A", [0])
    await schedule(s, "B", [1])
    await s.close()
    h.stores.remove(s)
    again = await h.new_store()
    assert await again.counters() == {"origin": 100, "peer": 0, "local": 0, "served": 300,
                                      "uploaded": 0}
    assert await parents(again, "C", 0) == ["A"]
    assert (await one(again, "C", 1)).action == "wait"
    assert await again.back_to_source() == 1
    # What vouches for a map is kept too: one confirmation (a second seals), the resets.
    await announce(again, "A", range(8), sealed=True)
    await again.blob_mismatch("D", TASK)
    await announce(again, "A", range(8), sealed=True)
    await announce(again, "B", range(8))
    await again.close()
    h.stores.remove(again)
    third = await h.new_store()
    await third.blob_mismatch("D", TASK)  # within the minute: ignored
    assert await holders(third, 0) == ["A", "B"]
    await announce(third, "B", [], sealed=True)
    assert (await third.task(TASK))["sealed"] is True


# -- long polls --------------------------------------------------------------------------------

async def _parked(s: Store, task_id: str = TASK) -> None:
    await until(lambda: _waiting(s, task_id), what="a parked schedule call")


async def _waiting(s: Store, task_id: str) -> bool:
    return s.waiters.waiting(task_id) > 0  # type: ignore[attr-defined]


async def test_long_poll_wakes_on_announce(h: Harness, no_recheck: None) -> None:
    s = h.store
    await setup(s)
    await schedule(s, "A", range(4))
    waiting = asyncio.create_task(schedule(s, "B", [2], wait_ms=20_000))
    await _parked(s)
    started = time.monotonic()
    await announce(s, "A", [2])
    (d,) = await asyncio.wait_for(waiting, 10)
    assert d.action == "parents" and [p.id for p in d.parents] == ["A"]
    assert time.monotonic() - started < 5


async def test_long_poll_wakes_when_the_lease_holder_leaves(h: Harness, no_recheck: None
                                                            ) -> None:
    s = h.store
    await setup(s)
    first = await one(s, "A", 0)
    waiting = asyncio.create_task(schedule(s, "B", [0], wait_ms=20_000))
    await _parked(s)
    await s.leave("A")
    (d,) = await asyncio.wait_for(waiting, 10)
    assert d.action == "source" and d.epoch > first.epoch


async def test_long_poll_answers_wait_when_time_runs_out(h: Harness) -> None:
    s = h.store
    await setup(s)
    await one(s, "A", 0)
    started = time.monotonic()
    d = await one(s, "B", 0, wait_ms=300)
    assert d.action == "wait"
    assert 0.3 <= time.monotonic() - started < 5


# -- Redis: replicas behave as one -------------------------------------------------------------

async def test_register_on_one_replica_schedule_on_another(
        two: tuple[RedisStore, RedisStore]) -> None:
    a, b = two
    await setup(a)
    await announce(a, "A", [0, 1])
    assert await parents(b, "B", 0) == ["A"]
    await heartbeat(b, "A", origin=10)  # the peer failed over to b
    assert (await a.counters())["origin"] == 10
    assert [p["id"] for p in await b.peers()] == ["A", "B", "C", "D"]
    await a.cordon("A")
    assert (await one(b, "C", 1)).action == "source"
    assert await a.task(TASK) == await b.task(TASK)


async def test_long_poll_on_one_replica_woken_by_announce_on_another(
        two: tuple[RedisStore, RedisStore], no_recheck: None) -> None:
    a, b = two
    await setup(a)
    await schedule(a, "A", range(4))
    waiting = asyncio.create_task(schedule(b, "B", [3], wait_ms=20_000))
    await _parked(b)
    await announce(a, "A", [3])
    (d,) = await asyncio.wait_for(waiting, 10)
    assert d.action == "parents" and [p.id for p in d.parents] == ["A"]


async def test_an_announcement_on_one_replica_wakes_only_the_polls_for_its_pieces(
        two: tuple[RedisStore, RedisStore], no_recheck: None) -> None:
    """The wake-up names the pieces announced, as in memory: a poll for another piece is not
    made to decide again."""
    a, b = two
    await setup(a)
    await schedule(a, "A", range(8))  # A holds every lease: B's and C's polls wait
    decided: list[list[int]] = []
    real = b._decide

    async def counting(req: ScheduleRequest,
                       pieces: tuple[int, ...] | None = None) -> list[Decision]:
        decided.append(list(req.pieces if pieces is None else pieces))
        return await real(req, pieces)
    b._decide = counting  # type: ignore[method-assign]
    on3 = asyncio.create_task(schedule(b, "B", [3], wait_ms=20_000))
    await _parked(b)
    probe = asyncio.create_task(schedule(b, "C", [5], wait_ms=20_000))
    await until(lambda: _count(b, 2), what="two parked polls")
    before = decided.count([3])
    await announce(a, "A", [5])
    (d,) = await asyncio.wait_for(probe, 10)  # b heard of piece 5 ...
    assert d.action == "parents"
    await b.task(TASK)  # (a round trip: a re-decision begun with the probe's is done)
    assert decided.count([3]) == before  # ... and left the poll for piece 3 alone
    await announce(a, "A", [3])
    (d,) = await asyncio.wait_for(on3, 10)
    assert d.action == "parents" and [p.id for p in d.parents] == ["A"]


async def _count(s: Store, n: int) -> bool:
    return s.waiters.waiting(TASK) == n  # type: ignore[attr-defined]


async def test_concurrent_lease_requests_on_two_replicas_one_source(
        two: tuple[RedisStore, RedisStore]) -> None:
    a, b = two
    pids = [f"p{i}" for i in range(10)]
    for pid in pids:
        await peer(a, pid)
    for round_ in range(20):
        tid = f"sha256:{round_:064x}"
        await task(a, 4, task_id=tid)
        results = await asyncio.gather(*(
            schedule(a if i % 2 else b, pid, range(4), task_id=tid)
            for i, pid in enumerate(pids)))
        for piece in range(4):
            actions = sorted(r[piece].action for r in results)
            assert actions == ["source"] + ["wait"] * 9, (round_, piece, results)
        epochs = {d.epoch for r in results for d in r if d.action == "source"}
        assert len(epochs) == 1
    assert await a.back_to_source() == 20


async def test_concurrent_announcements_on_two_replicas_lose_nothing(
        two: tuple[RedisStore, RedisStore]) -> None:
    a, b = two
    pids = [f"p{i}" for i in range(8)]
    for pid in pids:
        await peer(a, pid)
    await task(a, 64)
    await asyncio.gather(*(
        announce(a if piece % 2 else b, pid, [piece])  # each peer through both replicas
        for piece in range(64) for i, pid in enumerate(pids) if (piece + i) % 3 == 0))
    view = await b.task(TASK)
    for p in view["piece_map"]:
        expected = sorted(pid for i, pid in enumerate(pids) if (p["index"] + i) % 3 == 0)
        assert p["holders"] == expected
    assert len(view["piece_map"]) == 64
    per_peer = {pid: sum(1 for piece in range(64) if (piece + i) % 3 == 0)
                for i, pid in enumerate(pids)}
    held = await b.redis.hgetall(b.keys.held(TASK))
    assert {k: int(v) for k, v in held.items()} == per_peer


async def test_concurrent_heartbeats_on_two_replicas_count_once(
        two: tuple[RedisStore, RedisStore]) -> None:
    a, b = two
    await peer(a, "A")
    await asyncio.gather(*(heartbeat(a if n % 2 else b, "A", origin=n) for n in range(1, 41)))
    assert (await a.counters())["origin"] == 40


async def test_an_expired_peer_is_not_handed_out_even_before_the_sweep(
        redis_server: RedisServer) -> None:
    """Redis: the peer's key expires by itself, whichever replica sweeps (or none yet)."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    harness = Harness("redis", Clock(), redis_server.url)
    try:
        s = await harness.new_store(heartbeat_interval=0.25)
        await setup(s, "A", "B")
        await announce(s, "A", [0])
        assert await parents(s, "B", 0) == ["A"]

        async def a_gone() -> bool:
            await heartbeat(s, "B")
            return await s.peer("A") is None

        await until(a_gone, seconds=10, what="A's key expired")
        assert (await one(s, "B", 0)).action == "source"  # any call keeps B alive
        assert await holders(s, 0) == ["A"]  # not swept yet ...
        assert await s.expire() == ["A"]  # ... until a replica sweeps
        assert await holders(s, 0) == []
    finally:
        await harness.close()


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_memory_and_redis_give_the_same_answers(request: pytest.FixtureRequest,
                                                      kind: str) -> None:
    """One scripted history, both stores: the same decisions and the same piece maps."""
    mem = Harness("memory", Clock(), None)
    red = Harness(kind, Clock(), await _backend(request, kind))
    stores = [await mem.new_store(), await red.new_store()]

    async def history(s: Store, clock: Clock) -> list:
        out: list = []
        await setup(s, "A", "B", "C", "D", pieces=24)
        out += await schedule(s, "A", range(20))
        out += await schedule(s, "B", range(10, 24))
        out.append(await announce(s, "A", range(0, 16, 2)))
        out.append(await announce(s, "B", {16: chunk(16), 3: chunk(999)}))
        clock.advance(1.0)
        out.append(await announce(s, "A", [], progress=(1,)))
        clock.advance(1.5)
        out += [(d.action, d.epoch, d.first, d.last, d.reason)
                for d in await schedule(s, "C", range(24))]
        await s.report(Report(peer_id="C", parent_id="A", task_id=TASK, piece=2, kind="corrupt"))
        out.append(await s.task(TASK))
        out.append([(p["id"], p["penalised"], p["penalty_reason"], p["tasks"])
                    for p in await s.peers()])
        out.append(await s.tasks())
        other = "https://other.example"
        out += await schedule(s, "D", range(4), registry=other)
        out.append(await announce(s, "D", {0: chunk(0), 5: chunk(55), 22: chunk(22)},
                                  registry=other))
        out.append(await announce(s, "A", range(24), sealed=True))
        out.append(await announce(s, "C", range(24), sealed=True))
        out.append(await s.task(TASK))
        await s.blob_mismatch("B", TASK)
        out.append(await s.task(TASK))
        out.append([(p["id"], p["penalised"], p["penalty_reason"]) for p in await s.peers()])
        return out

    try:
        mem_out, red_out = [await history(s, h.clock) for s, h in zip(stores, (mem, red),
                                                                          strict=True)]
        # parents are ranked with a random tie-break: compare holders, not their order
        for x, y in zip(mem_out, red_out, strict=True):
            if isinstance(x, Decision) and x.action == "parents":
                assert {p.id for p in x.parents} == {p.id for p in y.parents}
                continue
            assert x == y
    finally:
        await mem.close()
        await red.close()


# -- Partial: a plan that misses data fails loudly ---------------------------------------------

def test_partial_map_refuses_what_was_not_loaded() -> None:
    m = Partial({1: "a"}, [1, 2], unloaded=3)
    assert m.get(1) == "a" and m.get(2) is None and 2 not in m
    assert len(m) == 4 and m
    with pytest.raises(NotLoaded):
        m.get(7)
    with pytest.raises(NotLoaded):
        m[7] = "x"
    with pytest.raises(NotLoaded):
        list(m.values())
    m.extend({7: "z"}, [7])
    assert m[7] == "z" and len(m) == 4
    m.clear()
    assert not m and m.get(99) is None and list(m.items()) == []
    uncounted = Partial({}, [1], unloaded=None)  # its size was not read: `not m` is unknown
    with pytest.raises(NotLoaded):
        bool(uncounted)


# -- IDCs: a piece crosses into an IDC once (helper G) -----------------------------------------

@pytest.mark.usefixtures("two_children")
async def test_a_piece_crosses_into_an_idc_once(h: Harness, no_recheck: None) -> None:
    s = h.store
    await peer(s, "F", idc="i1", upload_slots=8)
    for pid in ("A", "B", "C"):
        await peer(s, pid, idc="i2")
    await peer(s, "U")  # no IDC label: as before
    await task(s, 2)
    await schedule(s, "F", [0, 1])
    await announce(s, "F", [0, 1])
    assert await parents(s, "A", 0) == ["F"]  # the IDC's first requester crosses
    d = await one(s, "B", 0)  # F has room, but A's copy into i2 is in flight
    assert (d.action, d.reason) == ("wait", "idc-copy-in-flight")
    assert await parents(s, "U", 0) == ["F"]
    waiting = asyncio.create_task(schedule(s, "B", [0], wait_ms=20_000))
    await _parked(s)
    await announce(s, "A", [0])  # the copy landed: B is woken and fetches inside i2
    (d,) = await asyncio.wait_for(waiting, 10)
    assert d.action == "parents" and d.parents[0].id == "A", d
    # A copy whose child died holds the IDC back no longer than a lease timeout.
    assert await parents(s, "C", 1) == ["F"]
    assert (await one(s, "B", 1)).reason == "idc-copy-in-flight"
    h.clock.advance(LEASE + 0.01)
    await heartbeat(s, "F")
    await heartbeat(s, "B")
    assert await parents(s, "B", 1) == ["F"]


# -- claims riding a schedule call (helper X) --------------------------------------------------

async def announce_and_schedule(s: Store, pid: str, claimed: list[int], wanted: list[int], *,
                                wait_ms: int = 0) -> tuple:
    """What the API does with a schedule call carrying claims: one store operation where the
    store offers it, else announce then schedule."""
    ann = Announce(peer_id=pid, task_id=TASK,
                   pieces=[PieceClaim(index=i, chunk=chunk(i)) for i in claimed])
    req = ScheduleRequest(peer_id=pid, task_id=TASK, pieces=wanted, wait_ms=wait_ms,
                          announce=ann)
    both = getattr(s, "announce_and_schedule", None)
    if both is not None:
        return await both(ann, req)
    return await s.announce(ann), await s.schedule(req)


async def test_claims_riding_a_schedule_call_count_before_its_decisions(
        h: Harness, no_recheck: None) -> None:
    s = h.store
    await setup(s, "A", "B", "C")
    await schedule(s, "A", [0, 1])
    await schedule(s, "B", [2])
    waiting = asyncio.create_task(schedule(s, "C", [0], wait_ms=20_000))  # A's lease: wait
    await _parked(s)
    # A's claims are recorded before its next pieces are decided: 2 is B's lease, 3 is new.
    reply, (d2, d3) = await announce_and_schedule(s, "A", [0, 1], [2, 3])
    assert (reply.accepted, reply.rejected) == (2, [])
    assert (d2.action, d3.action, d3.reason) == ("wait", "source", "no-holder")
    (d,) = await asyncio.wait_for(waiting, 10)  # woken by the claim on 0
    assert d.action == "parents" and [p.id for p in d.parents] == ["A"]
    assert await holders(s, 1) == ["A"]
    # A refused claim is answered as announce answers it, the decisions still made.
    reply, (d4,) = await announce_and_schedule(s, "B", [9], [4])
    assert reply.rejected == [9] and d4.action == "source"
    with pytest.raises(UnknownPeer):
        await announce_and_schedule(s, "Z", [5], [5])


async def test_claims_riding_a_schedule_call_are_one_store_operation(
        redis_h: Harness) -> None:
    s = redis_h.store
    assert isinstance(s, RedisStore)
    await setup(s, "A", "B")
    runs = {"read": 0, "apply": 0}

    def counted(name: str, batched: Callable[[str, str], Awaitable[Any]]
                ) -> Callable[[str, str], Awaitable[Any]]:
        async def call(key: str, arg: str) -> Any:
            runs[name] += 1
            return await batched(key, arg)
        return call
    s.read, s.apply = counted("read", s.read), counted("apply", s.apply)  # type: ignore

    async def cost(call: Awaitable[Any]) -> tuple[int, int]:
        runs.update(read=0, apply=0)
        await call
        return runs["read"], runs["apply"]
    await schedule(s, "A", [0, 1])
    combined = await cost(announce_and_schedule(s, "A", [0, 1], [2]))
    await task(s, 8, OTHER)
    await schedule(s, "A", [0, 1], task_id=OTHER)
    ann = Announce(peer_id="A", task_id=OTHER,
                   pieces=[PieceClaim(index=i, chunk=chunk(i)) for i in (0, 1)])
    req = ScheduleRequest(peer_id="A", task_id=OTHER, pieces=[2])
    apart = await cost(s.announce(ann))
    apart = tuple(a + b for a, b in zip(apart, await cost(s.schedule(req)), strict=True))
    assert combined[0] <= apart[0] and combined[1] < apart[1], (combined, apart)
    if redis_h.kind == "redis":  # one loaded state (at most two rounds), one transaction
        assert combined[0] <= 2 and combined[1] == 1, combined
    assert await parents(s, "B", 1) == ["A"]
    assert await parents(s, "B", 1, task_id=OTHER) == ["A"]


async def test_a_decision_reads_a_sample_of_many_holders(redis_h: Harness) -> None:
    """A piece many hold: the plan reads the records of the sample the rule weighs, not every
    holder's; when the rule reaches past its sample (too few usable in it), all are read."""
    s = redis_h.store
    assert isinstance(s, RedisStore)
    crowd = [f"H{i:02d}" for i in range(HOLDER_SAMPLE * 3)]
    await setup(s, "R", *crowd)
    for pid in crowd:
        await announce(s, pid, [0, 1])
    records: list[int] = []
    prefix = s.keys.peer("")[:-1]
    read = s.read

    async def counting(key: str, arg: str) -> Any:
        records.append(sum(c[0] == "HMGET" and c[1].startswith(prefix)
                           for c in json.loads(arg)))
        return await read(key, arg)
    s.read = counting  # type: ignore[method-assign]
    d = await one(s, "R", 0)
    assert d.action == "parents" and {p.id for p in d.parents} <= set(crowd)
    assert HOLDER_SAMPLE < sum(records) <= HOLDER_SAMPLE + 2, records  # the sample, R
    usable = crowd[:2]
    for pid in crowd[2:]:
        await s.cordon(pid)
    records.clear()
    d = await one(s, "R", 1)  # a sample has at most 2 usable: all holders are weighed
    assert d.action == "parents" and {p.id for p in d.parents} == set(usable), d
    assert sum(records) > len(crowd), records


async def test_a_decision_reads_the_leases_of_the_pieces_it_names(
        redis_h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other peers' live leases: a decision on a piece others hold reads no lease holder's
    record and leaves the leases field unwritten; one on a piece nobody holds, which it may
    lease beside them (the requester's room; with an IDC, unless another IDC leases), reads
    them all."""
    s = redis_h.store
    assert isinstance(s, RedisStore)
    lessees = [f"L{i}" for i in range(4)]
    await setup(s, "R", "H", *lessees, pieces=16)
    for n, pid in enumerate(lessees):
        assert (await one(s, pid, 8 + n)).action == "source"
    await announce(s, "H", [0, 1])
    ids = {s.keys.peer(pid): pid for pid in ["R", "H", *lessees]}
    read = s.read
    records: set[str] = set()

    async def recording(key: str, arg: str) -> Any:
        records.update(ids[c[1]] for c in json.loads(arg) if c[0] == "HMGET" and c[1] in ids)
        return await read(key, arg)
    s.read = recording  # type: ignore[method-assign]
    specs = _record_applies(s)
    assert await parents(s, "R", 0) == ["H"]
    assert records == {"R", "H"}, records
    assert not any("leases" in o for spec in specs for o in spec["o"]), specs
    records.clear()
    d = await one(s, "R", 12)
    assert d.action == "source", d
    assert records >= set(lessees), records
    assert any("leases" in o for spec in specs for o in spec["o"]), specs
    await peer(s, "Q", idc="x")  # a requester with an IDC: no lease room to count
    ids[s.keys.peer("Q")] = "Q"
    records.clear()
    assert (await one(s, "Q", 13)).action == "source"
    assert not records & set(lessees), records
    monkeypatch.setattr(scheduler.state, "LEASE_IDC", True)  # whether another IDC leases
    records.clear()
    assert (await one(s, "Q", 14)).action == "source"  # the lessees have no IDC label
    assert records >= {"Q", *lessees}, records


async def test_while_one_idc_leases_a_requester_of_another_waits(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """scheduler/state.py LEASE_IDC, in both stores: a labelled requester leases nothing
    while a peer of another IDC holds a live lease of the task (its pieces would cross back
    into the origin's IDC), and leases once that lease lapses; one of the same IDC leases."""
    monkeypatch.setattr(scheduler.state, "LEASE_IDC", True)  # off by default since stop 26
    s = h.store
    await peer(s, "E1", idc="east")
    await peer(s, "E2", idc="east")
    await peer(s, "W", idc="west")
    await task(s, 16)
    assert (await one(s, "E1", 0)).action == "source"
    d = await one(s, "W", 8)
    assert (d.action, d.reason) == ("wait", "lease-idc"), d
    assert (await one(s, "E2", 8)).action == "source"
    h.clock.advance(LEASE + 0.5)  # past the lease timeout, no progress
    assert (await one(s, "W", 12)).action == "source"


def _record_applies(s: RedisStore) -> list[dict]:
    """Every apply script's spec `s` sends from now on, decoded, in order."""
    specs: list[dict] = []
    apply = s.apply

    async def recording(key: str, arg: str) -> Any:
        specs.append(json.loads(arg))
        return await apply(key, arg)
    s.apply = recording  # type: ignore[method-assign]
    return specs


async def test_a_hand_out_writes_only_the_child_it_admitted(redis_h: Harness) -> None:
    """A piece's holders and its children in flight are stored apart: a decision on a piece
    many hold writes the one child it admitted, not the piece's holders."""
    s = redis_h.store
    assert isinstance(s, RedisStore)
    crowd = [f"H{i:02d}" for i in range(HOLDER_SAMPLE * 2)]
    await setup(s, "R", *crowd)
    for pid in crowd:
        await announce(s, pid, [0])
    specs = _record_applies(s)
    assert (await one(s, "R", 0)).action == "parents"
    ops = [(o[0], spec["k"][o[1] - 1], o[2:]) for spec in specs for o in spec["o"]]
    assert all(key != s.keys.holders(TASK) for _, key, _ in ops), ops
    assert [(op, args) for op, key, args in ops if key == s.keys.children(TASK, 0)] == \
        [("hset", ["R", repr(redis_h.clock.t)])]


async def test_a_claim_appends_its_holder_and_the_field_reads_back_whole(
        redis_h: Harness) -> None:
    """A claim on a piece many hold sends its one holder to append, not the piece's whole
    holders field; a withdrawal rewrites the field, and every call reads what they left."""
    s = redis_h.store
    assert isinstance(s, RedisStore)
    crowd = [f"H{i:02d}" for i in range(HOLDER_SAMPLE * 2)]
    await setup(s, "R", "Z", *crowd)
    await announce(s, crowd[0], [0, 1])
    for pid in crowd[1:]:
        await announce(s, pid, [0])
    specs = _record_applies(s)
    await announce(s, "Z", [0, 1])
    ops = [(o[0], o[2:]) for spec in specs for o in spec["o"]
           if spec["k"][o[1] - 1] == s.keys.holders(TASK)]
    assert ops == [("happend", ["0", "Z", "1", "Z"])], ops
    field = await s.redis.hget(s.keys.holders(TASK), "0")
    assert set(field.split(",")) == {*crowd, "Z"}
    # What this replica expects the append left is what Redis holds: the next read is a hit.
    assert s.holder_sets.pieces[(TASK, 0)].raw == field
    await s.withdraw(Withdraw(peer_id=crowd[0], task_id=TASK, pieces=[0, 1]))
    assert await s.redis.hget(s.keys.holders(TASK), "1") == "Z"
    assert set((await s.redis.hget(s.keys.holders(TASK), "0")).split(",")) == \
        {*crowd[1:], "Z"}
    d = await one(s, "R", 1)
    assert d.action == "parents" and [p.id for p in d.parents] == ["Z"]


def _record_holders_reads(s: RedisStore) -> list[list]:
    """The replies to every `HOLDERS` read `s` makes from now on, in order: per piece its
    field (0: unchanged since the version sent) and its version (False: none vouched for)."""
    replies: list[list] = []
    read = s.read

    async def recording(key: str, arg: str) -> Any:
        raw = await read(key, arg)
        for cmd, reply in zip(json.loads(arg), json.loads(raw) or [], strict=True):
            if cmd[0] == "HOLDERS":
                replies.append(reply)
        return raw
    s.read = recording  # type: ignore[method-assign]
    return replies


async def test_a_holders_field_read_once_is_not_sent_again_while_unchanged(
        redis_h: Harness) -> None:
    """A piece many hold: once a replica has decoded its holders field, a call on it gets back
    only the field's version while it is unchanged (redis-server encoded the whole field for
    every decision), and this replica's claims keep it current. A write by a replica of the
    earlier layout, which keeps no versions, is read whole, and versioned again by this
    layout's next write; a task made again is read whole."""
    s = redis_h.store
    assert isinstance(s, RedisStore)
    crowd = [f"H{i:02d}-holder" for i in range(HOLDER_SAMPLE * 2)]
    assert len(",".join(crowd)) >= VERSIONED  # (shorter ones are read again, not checked)
    await setup(s, "R", "S", "T", "Z", *crowd)
    for pid in crowd:
        await announce(s, pid, [0, 1])
    replies = _record_holders_reads(s)
    assert (await one(s, "R", 0)).action == "parents"
    await announce(s, "Z", [0])  # this replica's claim: appended, its new version known here
    assert (await one(s, "S", 0)).action == "parents"
    assert replies and all(r[0] == 0 and r[1] for r in replies), replies
    field = await s.redis.hget(s.keys.holders(TASK), "0")
    assert set(field.split(",")) == {*crowd, "Z"}
    # A replica of the earlier layout withdraws crowd[0]'s piece 0: its write moves the task's
    # version, not the field's.
    client, key = s.redis, s.keys.task(TASK)
    await client.hset(s.keys.holders(TASK), "0", ",".join(sorted({*crowd[1:], "Z"})))
    await client.hset(key, "v", str(int(await client.hget(key, "v")) + 1))
    replies.clear()
    d = await one(s, "T", 0)  # (a child admitted: a write)
    assert d.action == "parents" and crowd[0] not in {p.id for p in d.parents}
    assert [r[0] for r in replies] == [",".join(sorted({*crowd[1:], "Z"}))], replies
    assert not replies[0][1]  # no version vouched for: an earlier layout wrote last
    cached = s.holder_sets.cached(TASK, 0)
    assert cached is not None and cached[0].base == {*crowd[1:], "Z"}
    # That decision, this layout's write, dropped every version (any field may have changed)
    # and gave one to the field it read whole, in one snapshot with the task's version it is
    # fenced on: the next call gets the version back, not the field.
    version = await client.hget(key, "v")
    assert await client.hgetall(s.keys.holders_seq(TASK)) == {"0": version}
    assert cached[1] == (await client.hget(key, "created_at"), version)
    replies.clear()
    assert crowd[0] not in await parents(s, "S", 0)
    assert [r[0] for r in replies] == [0], replies
    # The task made again (deleted by hand; the rules never delete one), through another
    # replica: its fields' versions count again from the start, so one may come back to what
    # this replica holds for the old task's field, which must not be taken for the new one's.
    await announce(s, "R", [0])  # a claim by this layout: the field's version known here
    seq = await client.hget(s.keys.holders_seq(TASK), "0")
    assert seq == await client.hget(key, "v")
    cached = s.holder_sets.cached(TASK, 0)
    assert seq and cached is not None and cached[1] is not None and cached[1][1] == seq
    await client.delete(key, s.keys.chunk(TASK), s.keys.holders(TASK), s.keys.held(TASK),
                        s.keys.holders_seq(TASK), *(s.keys.children(TASK, i) for i in (0, 1)))
    redis_h.clock.advance(1)
    other = await redis_h.new_store()
    await task(other, 8)
    others = [f"N{i:02d}-holder" for i in range(HOLDER_SAMPLE * 2)]
    for pid in others:
        await peer(other, pid)
        await announce(other, pid, [0])
    await client.hset(s.keys.holders_seq(TASK), "0", seq)
    assert set(await parents(s, "R", 0)) <= set(others)


@pytest.mark.usefixtures("two_children")
async def test_children_an_earlier_layout_wrote_still_count_and_are_moved(
        redis_h: Harness) -> None:
    """A rolling upgrade: a replica of the earlier layout keeps a piece's children after its
    holders in the one field (`H|A=t`). Its holders read as holders here and this layout's
    field (`H`) reads as holders there; what it recorded counts toward the children's share
    here, stays while an announcement rewrites the holders, and moves into the children hash
    at this layout's next decision on the piece."""
    s = redis_h.store
    assert isinstance(s, RedisStore)
    await setup(s, "H", "A", "B", "C", "D")
    await schedule(s, "H", [0])
    await announce(s, "H", [0])
    await announce(s, "D", [1])
    client = s.redis
    t = repr(redis_h.clock.t)
    await client.hset(s.keys.holders(TASK), "0", f"H|A={t}")  # A sent to H by that replica
    await announce(s, "D", [0])  # a claim appends its holder, before what follows the `|`
    assert await client.hget(s.keys.holders(TASK), "0") == f"H,D|A={t}"
    await s.withdraw(Withdraw(peer_id="D", task_id=TASK, pieces=[0]))
    assert await client.hget(s.keys.holders(TASK), "0") == f"H|A={t}"
    assert await parents(s, "B", 0) == ["H"]
    d = await one(s, "C", 0)  # two children in flight for one holder: A and B
    assert (d.action, d.reason) == ("wait", "holders-busy")
    assert await client.hget(s.keys.holders(TASK), "0") == "H"
    assert await client.hgetall(s.keys.children(TASK, 0)) == {"A": t, "B": t}


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
async def test_concurrent_calls_on_a_task_run_as_one_with_the_answers_of_one_by_one(
        request: pytest.FixtureRequest, kind: str) -> None:
    """A replica's calls on one task that queue while one runs are read, decided and written
    together: the same answers as the memory store's, which runs them one after another."""
    mem = Harness("memory", Clock(), None)
    red = Harness(kind, Clock(), await _backend(request, kind))
    stores = [await mem.new_store(), await red.new_store()]
    assert isinstance(stores[0], MemoryStore) and isinstance(stores[1], RedisStore)
    stores[0].state.rng = random.Random(0)
    stores[1].rng = random.Random(0)
    applied = [0]
    apply = stores[1].apply

    async def counting(key: str, arg: str) -> Any:
        applied[0] += 1
        return await apply(key, arg)
    stores[1].apply = counting  # type: ignore[method-assign]
    crowd = [f"P{i:02d}" for i in range(12)]

    async def history(s: Store) -> list:
        await setup(s, *crowd, pieces=16)
        out: list = []
        out += await asyncio.gather(*(schedule(s, p, [n % 16, (n + 5) % 16])
                                      for n, p in enumerate(crowd)))
        out += await asyncio.gather(*(announce(s, p, [n % 16]) for n, p in enumerate(crowd)))
        for r in range(3):
            out += await asyncio.gather(*(
                announce_and_schedule(s, p, [(n + 5 + r) % 16], [(n + 6 + r) % 16, 15 - n])
                for n, p in enumerate(crowd)))
        out += await asyncio.gather(schedule(s, "P00", [3]), s.leave("P01"),
                                    schedule(s, "P02", [1, 2]), announce(s, "Z", [4]),
                                    return_exceptions=True)
        out.append(await s.task(TASK))
        out.append([(p["id"], p["tasks"]) for p in await s.peers()])
        return out

    try:
        mem_out = await history(stores[0])
        applied[0] = 0
        red_out = await history(stores[1])
        if kind == "redis":  # (a cluster writes a part per slot: the peers' are theirs)
            assert applied[0] < 12 * 5, applied  # 12 peers' 5 rounds of calls, and setup
        def ids(x: Any) -> Any:
            """Who, not where (each store's peers got their own address) nor in which order
            (a random tie-break, drawn in the order of a set's history)."""
            if isinstance(x, Decision):
                return x.model_copy(update={"parents": sorted(p.id for p in x.parents)})
            return [ids(y) for y in x] if isinstance(x, list | tuple) else x
        for x, y in zip(mem_out, red_out, strict=True):
            if isinstance(x, Exception):
                assert type(x) is type(y)
            elif isinstance(x, list | tuple):
                assert ids(x) == ids(y)
            elif isinstance(x, dict) and "leases" in x:
                assert {**x, "leases": None} == {**y, "leases": None}
                assert sorted(x["leases"], key=str) == sorted(y["leases"], key=str)
            else:
                assert x == y
    finally:
        await mem.close()
        await red.close()


async def test_claims_riding_a_long_poll_that_takes_over_waits_still_count(h: Harness) -> None:
    """A poll answered once one of its pieces was ready leaves its other waits to the peer's
    next poll, which takes them over: its claims are recorded all the same."""
    s = h.store
    await setup(s, "A", "B", "C")
    await one(s, "B", 0)  # B leases 0: A waits for it
    (d0, d1) = await schedule(s, "A", [0, 1], wait_ms=5_000)
    assert (d0.action, d1.action) == ("wait", "source")
    reply, (d,) = await announce_and_schedule(s, "A", [1], [0], wait_ms=1)
    assert reply.accepted == 1 and d.action == "wait"
    assert await holders(s, 1) == ["A"]
