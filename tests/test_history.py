"""The scheduler's history of cluster totals (scheduler/history.py, history_redis.py): the ring's
rules directly, the Redis ring with two stores over a real redis-server, and two real scheduler
replicas over one Redis showing the same series of a cluster that moved real bytes. The piece
grid of `GET /api/v1/tasks/{id}` (scheduler/api.py `piece_grid`) is here too."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from common.models import Heartbeat, PeerCounters, PeerRegistration
from scheduler import history
from scheduler.api import piece_grid
from scheduler.history import MemoryHistory, Ring, Sample, next_wake, rates, saving, savings, slot
from scheduler.history_redis import RedisHistory
from scheduler.openapi import document
from scheduler.redis_store import RedisStore
from scheduler.store import MemoryStore
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    metric,
    pull_digest,
    push_blob,
    until,
)
from tests.redis_servers import RedisServer
from tests.test_openapi import _response_schema, _validator

MiB = 1 << 20


def s(t: float, origin: int = 0, peer: int = 0, local: int = 0, served: int = 0) -> Sample:
    return Sample(t, origin, peer, local, served)


# -- the ring and its figures, pure --------------------------------------------------------------

def test_the_ring_keeps_one_sample_per_slot_in_time_order_and_at_most_capacity() -> None:
    ring = Ring(interval=5.0, capacity=3)
    assert ring.add(s(100.2))
    assert not ring.add(s(104.9))  # the same slot (100..105): a second replica's sample
    assert not ring.add(s(99.0))   # an earlier slot: a clock stepped back
    assert ring.add(s(105.0)) and ring.add(s(111.0)) and ring.add(s(117.5))
    assert [x.t for x in ring.samples()] == [105.0, 111.0, 117.5]  # the oldest gone
    with pytest.raises(ValueError):
        Ring(interval=0, capacity=3)


def test_rates_are_bytes_per_second_over_each_interval_and_a_reset_counts_from_zero() -> None:
    samples = [s(10, origin=0, peer=0), s(12, origin=4000, peer=1000),
               s(14, origin=4000, peer=5000, local=300), s(16, origin=100, peer=5000)]
    r = rates(samples)
    assert r["origin"] == [None, 2000.0, 0.0, 50.0]  # 4000 -> 100: a store that lost its totals
    assert r["peer"] == [None, 500.0, 2000.0, 0.0]
    assert r["local"] == [None, 0.0, 150.0, 0.0]  # 300 -> 0: reset, nothing new counted
    assert rates([]) == {"origin": [], "peer": [], "local": []}
    assert rates([s(1)])["peer"] == [None]


def test_the_saving_over_a_window_and_over_the_whole_history() -> None:
    # Every 10 s: served 100 per interval; from the origin 100, then 50, then 0, then 0.
    samples = [s(0), s(10, origin=100, served=100), s(20, origin=150, served=200),
               s(30, origin=150, served=300), s(40, origin=150, served=400)]
    assert saving(samples) == 1 - 150 / 400
    assert saving(samples[2:]) == 1.0
    assert saving(samples[:1]) is None and saving([s(0), s(5)]) is None  # nothing served
    # Over 20 s before each sample (from the latest sample at least 20 s older).
    assert savings(samples, 20) == [None, 0.0, 1 - 150 / 200, 1 - 50 / 200, 1.0]
    # A window longer than the history: from the first sample.
    assert savings(samples, 3600) == [None, 0.0, 0.25, 0.5, 0.625]
    idle = [s(0, served=10), s(10, served=10)]
    assert savings(idle, 60) == [None, None]


def test_the_view_is_columns_aligned_by_sample() -> None:
    samples = [s(1000.0001, 1, 2, 3, 6), s(1005, 11, 22, 33, 66)]
    v = history.view(samples, interval=5.0, capacity=720, window=60.0)
    assert v["t"] == [1000.0, 1005.0]
    assert v["bytes"] == {"origin": [1, 11], "peer": [2, 22], "local": [3, 33]}
    assert v["served_bytes"] == [6, 66]
    assert v["rates"]["origin"] == [None, 2.0]
    assert v["saving"] == [None, round(1 - 10 / 60, 4)] and v["saving_ratio"] == v["saving"][1]
    assert (v["interval"], v["capacity"], v["window"]) == (5.0, 720, 60.0)
    empty = history.view([], 5.0, 720)
    assert empty["t"] == [] and empty["saving_ratio"] is None


def test_the_sampler_wakes_just_inside_the_next_slot() -> None:
    for now in (100.0, 101.3, 104.99):
        wake = now + next_wake(now, 5.0)
        assert slot(wake, 5.0) == slot(now, 5.0) + 1
        assert 105.0 < wake < 105.5


async def test_memory_history_samples_the_store_totals() -> None:
    clock = iter([100.0, 101.0, 106.0])
    store = MemoryStore()
    log = MemoryHistory(store.counters, interval=5.0, capacity=10, clock=lambda: next(clock))
    await store.register(PeerRegistration(id="a", upload_addr="10.0.0.1:65002"))
    assert await log.sample()
    await store.heartbeat("a", Heartbeat(counters=PeerCounters(origin=10, served=10)))
    assert not await log.sample()  # the same slot
    assert await log.sample()
    assert await log.samples() == [s(100.0), s(106.0, origin=10, served=10)]


# -- the piece grid -----------------------------------------------------------------------------

def test_the_piece_grid_is_runs_per_holder_most_complete_first_ids_only_for_members() -> None:
    task = {"length": 6 * MiB, "piece_size": MiB, "piece_map": [
        {"index": 0, "holders": ["b", "c"]}, {"index": 1, "holders": ["b", "c"]},
        {"index": 2, "holders": ["c"]}, {"index": 4, "holders": ["a", "c"]},
        {"index": 5, "holders": ["a", "c"]}]}
    assert piece_grid(task, named=True) == [
        {"holder": "c", "held": 5, "runs": [[0, 2], [4, 5]]},
        {"holder": "a", "held": 2, "runs": [[4, 5]]},  # a tie: by id
        {"holder": "b", "held": 2, "runs": [[0, 1]]}]
    assert piece_grid(task, named=False) == [
        {"holder": None, "held": 5, "runs": [[0, 2], [4, 5]]},
        {"holder": None, "held": 2, "runs": [[4, 5]]},
        {"holder": None, "held": 2, "runs": [[0, 1]]}]
    assert piece_grid({"length": 0, "piece_size": MiB, "piece_map": []}, named=True) == []


# -- the ring in Redis ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_server_history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-history"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_url(redis_server_history: RedisServer) -> AsyncIterator[str]:
    client = aioredis.Redis.from_url(redis_server_history.url)
    await client.flushall()
    await client.aclose()
    yield redis_server_history.url


async def test_two_stores_over_one_redis_keep_one_series(redis_url: str) -> None:
    """Two replicas' stores, each with its history over the same Redis: a slot sampled by one
    is not sampled by the other, both read the same samples, and they are the shared totals."""
    a, b = (RedisStore.from_url(redis_url, rng=random.Random(i)) for i in range(2))
    try:
        ha, hb = RedisHistory.of(a, interval=3600.0), RedisHistory.of(b, interval=3600.0)
        await a.register(PeerRegistration(id="p", upload_addr="10.0.0.1:65002"))
        await b.heartbeat("p", Heartbeat(counters=PeerCounters(origin=5, peer=7, local=1,
                                                                served=13)))
        taken = await asyncio.gather(ha.sample(), hb.sample())
        assert sorted(taken) == [False, True]  # one sample in this hour, whoever took it
        assert not await ha.sample() and not await hb.sample()
        (only,) = await ha.samples()
        assert await hb.samples() == [only]
        assert (only.origin, only.peer, only.local, only.served) == (5, 7, 1, 13)
        assert abs(only.t - (await a.redis.time())[0]) < 5  # Redis's clock
    finally:
        await a.close()
        await b.close()


async def test_the_redis_ring_is_capped_and_in_time_order(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    try:
        ring = RedisHistory.of(store, interval=0.001, capacity=3)  # a slot per millisecond
        taken = 0
        while taken < 8:
            taken += await ring.sample()
            await asyncio.sleep(0.002)
        got = await ring.samples()
        assert len(got) == 3 and await store.redis.llen(ring.key) == 3
        assert [slot(x.t, 0.001) for x in got] == sorted({slot(x.t, 0.001) for x in got})
        with pytest.raises(ValueError):
            RedisHistory.of(store, capacity=1)
    finally:
        await store.close()


# -- two real replicas -------------------------------------------------------------------------

async def _history(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/api/v1/history") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_two_scheduler_replicas_over_redis_show_the_same_history(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        redis_url: str) -> None:
    blob = os.urandom(2 * MiB + 777)
    digest = await push_blob(registry.url, repo, blob)
    one = await cluster.scheduler("--redis", redis_url, name="replica-1")
    two = await cluster.scheduler("--redis", redis_url, name="replica-2")
    # Each peer registers with a different replica: the totals meet only in Redis.
    a = await cluster.peer("a", one.url, origin.url)
    b = await cluster.peer("b", two.url, origin.url)
    assert await pull_digest(f"{a.url}/v2/{repo}/blobs/{digest}") == digest
    assert await pull_digest(f"{b.url}/v2/{repo}/blobs/{digest}") == digest

    async def sampled() -> bool:  # every byte reported, and a sample taken since
        h = await _history(two.url)
        return bool(h["served_bytes"]) and h["served_bytes"][-1] == 2 * len(blob)
    await until(sampled, 20, "a sample of every byte served, on replica 2")

    async def three() -> bool:  # a pull can take less than two sampling intervals
        return all(len(h["t"]) >= 3 for h in await asyncio.gather(_history(one.url),
                                                                  _history(two.url)))
    await until(three, 20, "three samples on each replica")
    h1, h2 = await asyncio.gather(_history(one.url), _history(two.url))
    n = min(len(h1["t"]), len(h2["t"]))  # a sample may land between the two reads
    assert n >= 3

    def head(h: dict) -> dict:
        return {"t": h["t"][:n], "served": h["served_bytes"][:n],
                **{k: h["bytes"][k][:n] for k in history.SOURCES},
                **{f"rate-{k}": h["rates"][k][:n] for k in history.SOURCES}}
    assert head(h1) == head(h2)
    assert await metric(one.url, "naiad_background_restarts_total",
                        {"loop": "scheduler-history"}) == 0  # a supervised loop, not failing
    spec = document()
    _validator(spec, _response_schema(spec, "/api/v1/history", "get")).validate(h1)
    # Both replicas sample every slot they see: one sample per slot means none was doubled.
    interval = h1["interval"]
    assert interval == 1.25  # 2.5 heartbeat intervals (tests/cluster.py: 0.5 s)
    slots = [slot(t, interval) for t in h1["t"]]
    assert slots == sorted(set(slots)), slots
    # The series is the bytes moved: one copy from the origin, one from a peer.
    assert h1["bytes"]["origin"][-1] == len(blob) and h1["bytes"]["peer"][-1] == len(blob)
    assert h1["bytes"]["origin"][0] == 0  # sampled from the replicas' start
    ts = h1["t"]
    for k, moved in (("origin", len(blob)), ("peer", len(blob))):
        integral = sum(r * (t1 - t0) for r, t0, t1 in zip(h1["rates"][k][1:], ts, ts[1:],
                                                           strict=False))
        assert abs(integral - moved) < 0.01 * moved, (k, integral, moved)
    async with member_session() as member, \
            member.get(f"{one.url}/api/v1/stats") as r:
        stats = await r.json()
    assert h1["saving_ratio"] == round(stats["savings_ratio"], 4) == 0.5
