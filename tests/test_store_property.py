"""Generated sequences of calls against the memory store, Redis and a Redis Cluster: the same
answers required (issue 14: one copy of every rule).

Each example is a sequence of register, heartbeat, ensure_task, announce, schedule (alone, and
carrying claims: one store operation on Redis), report, withdraw, leave, cordon, uncordon,
blob_mismatch and a clock jump followed by `expire`, over three peers and two tasks, run on all
three stores; every call's answer (or the error it raised) and, at the end, the views (peers,
tasks, each task's piece map, totals) must be equal. Time is an injected clock; a Redis peer's
record expires by Redis's own clock, so records live far longer than a sequence takes, and a
jump moves Redis's expiry too: the silent peers' records and index entries are made due at once
(the only place the test reaches into Redis)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.models import (
    Announce,
    Decision,
    Heartbeat,
    PeerCounters,
    PeerRegistration,
    PieceClaim,
    Report,
    ScheduleRequest,
    TaskRequest,
    Withdraw,
)
from common.pieces import MiB
from scheduler.redis_store import RedisStore
from scheduler.state import StateError
from scheduler.store import MemoryStore, Store
from tests.cluster import until
from tests.redis_servers import RedisCluster, RedisServer, redis_cluster, redis_server

__all__ = ["redis_cluster", "redis_server"]  # the fixtures, used here

PEERS = ("A", "B", "C")
TASKS = ("sha256:" + "1" * 64, "sha256:" + "2" * 64)
PIECES = 4
HB = 60.0  # a record lives 3 minutes: no sequence outlives one by itself
JUMP = 1000.0  # past every record's expiry, however far the clock moved before


def chunk(task: int, piece: int, variant: int = 0) -> str:
    return f"blake3:{task:032x}{piece + 100 * variant:032x}"


pid = st.sampled_from(PEERS)
tix = st.integers(0, len(TASKS) - 1)
pieces = st.lists(st.integers(0, PIECES - 1), min_size=1, max_size=PIECES, unique=True)
calls = st.one_of(
    st.tuples(st.just("register"), pid, st.sampled_from([1.0, 2.0])),
    st.tuples(st.just("heartbeat"), pid, st.sampled_from([1.0, 2.0]), st.integers(0, 5)),
    st.tuples(st.just("ensure_task"), tix),
    st.tuples(st.just("announce"), pid, tix, pieces, st.integers(0, 1), st.booleans()),
    st.tuples(st.just("schedule"), pid, tix, pieces),
    st.tuples(st.just("announce_schedule"), pid, tix, pieces, pieces, st.integers(0, 1)),
    st.tuples(st.just("report"), pid, pid, tix, st.sampled_from(["failed", "slow", "corrupt"]),
              st.integers(0, PIECES - 1)),
    st.tuples(st.just("withdraw"), pid, tix, st.one_of(st.none(), pieces)),
    st.tuples(st.just("leave"), pid),
    st.tuples(st.sampled_from(["cordon", "uncordon"]), pid),
    st.tuples(st.just("blob_mismatch"), pid, tix),
    st.tuples(st.just("advance"), st.sampled_from([0.1, 0.7, 2.5])),
    st.tuples(st.just("jump"), st.lists(pid, unique=True, max_size=2)),
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Under:
    """One store under test and its clock."""

    store: Store
    clock: Clock


async def _call(u: Under, call: tuple) -> Any:
    s, kind = u.store, call[0]
    if kind == "register":
        _, p, started = call
        await s.register(PeerRegistration(id=p, upload_addr=f"10.0.0.{ord(p)}:65002",
                                          started_at=started))
    elif kind == "heartbeat":
        _, p, started, origin = call
        await s.heartbeat(p, Heartbeat(counters=PeerCounters(started_at=started,
                                                             origin=origin)))
    elif kind == "ensure_task":
        return await s.ensure_task(TaskRequest(task_id=TASKS[call[1]], length=PIECES * MiB,
                                               piece_size=MiB))
    elif kind == "announce":
        _, p, t, which, variant, sealed = call
        return await s.announce(Announce(
            peer_id=p, task_id=TASKS[t], sealed=sealed,
            pieces=[PieceClaim(index=i, chunk=chunk(t, i, variant)) for i in which]))
    elif kind == "schedule":
        _, p, t, which = call
        return [_decision(d) for d in await s.schedule(ScheduleRequest(
            peer_id=p, task_id=TASKS[t], pieces=which))]
    elif kind == "announce_schedule":  # a schedule call carrying claims: one op where offered
        _, p, t, claimed, which, variant = call
        ann = Announce(peer_id=p, task_id=TASKS[t],
                       pieces=[PieceClaim(index=i, chunk=chunk(t, i, variant)) for i in claimed])
        req = ScheduleRequest(peer_id=p, task_id=TASKS[t], pieces=which, announce=ann)
        both = getattr(s, "announce_and_schedule", None)
        if both is not None:
            reply, decisions = await both(ann, req)
        else:  # the memory store: the two calls the API makes without it
            reply, decisions = await s.announce(ann), await s.schedule(req)
        return reply, [_decision(d) for d in decisions]
    elif kind == "report":
        _, p, parent, t, what, piece = call
        await s.report(Report(peer_id=p, parent_id=parent, task_id=TASKS[t], piece=piece,
                              kind=what))
    elif kind == "withdraw":
        _, p, t, which = call
        await s.withdraw(Withdraw(peer_id=p, task_id=TASKS[t], pieces=which))
    elif kind == "leave":
        await s.leave(call[1])
    elif kind == "cordon":
        await s.cordon(call[1])
    elif kind == "uncordon":
        await s.uncordon(call[1])
    elif kind == "blob_mismatch":
        await s.blob_mismatch(call[1], TASKS[call[2]])
    elif kind == "advance":
        u.clock.t += call[1]
    return None


def _decision(d: Decision) -> tuple:
    """Parents are ranked with a random tie-break: compare who, not in which order."""
    return (d.action, d.epoch, d.first, d.last, d.reason,
            frozenset(p.id for p in d.parents) if d.parents else None)


async def _step(u: Under, call: tuple) -> Any:
    try:
        return await _call(u, call)
    except StateError as e:
        return type(e).__name__


async def _jump(stores: list[Under], keep: list[str]) -> list:
    """Every peer silent past its expiry but `keep`, which heartbeat after the jump; then each
    store's `expire()`."""
    for u in stores:
        u.clock.t += JUMP
    beats = [[await _step(u, ("heartbeat", p, 1.0, 0)) for p in keep] for u in stores]
    for u in stores:
        if isinstance(u.store, RedisStore):  # Redis's clock jumps for the silent records
            r, k = u.store.redis, u.store.keys
            silent = [p for p in PEERS if p not in keep]
            for p in silent:
                await r.pexpire(k.peer(p), 1)
                await r.zadd(k.index(p), {p: 0}, xx=True)

            async def expired(r: Any = r, k: Any = k, silent: list[str] = silent) -> bool:
                return not any([await r.exists(k.peer(p)) for p in silent])
            await until(expired, 5, "the silent records expired")
    return [(b, sorted(await u.store.expire())) for b, u in zip(beats, stores, strict=True)]


async def _views(u: Under) -> Any:
    s = u.store
    return (await s.peers(), await s.tasks(), [_by_epoch(await s.task(t)) for t in TASKS],
            await s.counters(), await s.back_to_source())


def _by_epoch(view: dict | None) -> dict | None:
    """A task's leases in one order: the memory store lists them in its map's history (a piece
    leased again keeps its place), Redis in its encoding's (by epoch)."""
    if view is not None:
        view["leases"] = sorted(view["leases"], key=lambda le: le["epoch"])
    return view


async def _run(sequence: list[tuple], urls: dict[str, str]) -> None:
    clock = Clock()
    mem = MemoryStore(heartbeat_interval=HB, lease_timeout=1.0, clock=clock)
    mem.state.rng = random.Random(0)
    stores = [Under(mem, clock)]
    for kind, url in urls.items():
        clock = Clock()
        store = RedisStore.from_url(url, cluster=kind == "redis-cluster", heartbeat_interval=HB,
                                    lease_timeout=1.0, clock=clock, rng=random.Random(0))
        stores.append(Under(store, clock))
    try:
        for n, call in enumerate(sequence):
            if call[0] == "jump":
                answers = await _jump(stores, call[1])
            else:
                answers = [await _step(u, call) for u in stores]
            assert all(a == answers[0] for a in answers), (n, call, answers)
        views = [await _views(u) for u in stores]
        for v in views[1:]:
            assert v == views[0]
    finally:
        for u in stores[1:]:
            await u.store.close()


@pytest.fixture(scope="module")
def urls(redis_server: RedisServer, redis_cluster: RedisCluster) -> dict[str, str]:
    return {"redis": redis_server.url, "redis-cluster": redis_cluster.url}


async def _flush(server: RedisServer, cluster: RedisCluster) -> None:
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    await client.aclose()
    await cluster.flush()


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(calls, min_size=5, max_size=20).map(
    lambda seq: [("register", "A", 1.0), ("register", "B", 1.0), ("ensure_task", 0), *seq]))
def test_every_store_gives_the_same_answers(sequence: list[tuple], urls: dict[str, str],
                                            redis_server: RedisServer,
                                            redis_cluster: RedisCluster) -> None:
    async def example() -> None:
        await _flush(redis_server, redis_cluster)
        await _run(sequence, urls)
    asyncio.run(example())
