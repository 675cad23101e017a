"""A scheduler on a real Redis Cluster (issue 14): `naiad scheduler --redis-cluster` with peers
pulling through it, and the master serving the task's slot SIGKILLed in the middle of the
distribution. Every pull completes with the right sha256, the scheduler answers 503 (never
another error) only until the master's replica is promoted, and the map of a blob distributed
before the failure, on the same master, is still there. (The store behaviour suite runs on a
cluster too: tests/test_store_behaviour.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import RedisError

import scheduler.store as store_module
from common.models import (
    Announce,
    Decision,
    Heartbeat,
    PeerCounters,
    PeerRegistration,
    PieceClaim,
    ScheduleRequest,
    TaskRequest,
)
from scheduler.history_redis import RedisHistory
from scheduler.redis_store import RedisStore
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    free_port,
    member_session,
    naiad,
    push_blob,
    spawn,
    until,
    wait_http,
)
from tests.redis_servers import RedisCluster
from tests.test_e2e_replicas import _pull, _reached

MiB = 1 << 20
TASK = "sha256:" + "f" * 64
PROMOTION_BOUND = 20.0  # seconds from the kill to answers again (node timeout 1 s + election)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """Its own cluster: the test kills one of its masters."""
    rc = RedisCluster(tmp_path / "redis-cluster")
    try:
        rc.create()
        yield rc
    finally:
        rc.stop()


@pytest.fixture(scope="module")
def quiet_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A cluster no test here breaks."""
    rc = RedisCluster(tmp_path_factory.mktemp("redis-cluster-quiet"))
    try:
        rc.create()
        yield rc
    finally:
        rc.stop()


async def test_two_stores_on_a_cluster_keep_one_history_of_the_summed_totals(
        quiet_cluster: RedisCluster) -> None:
    """The history script runs on its own key's slot: two replicas sampling in the same slot
    store one sample, and it holds the totals summed over the counter shards."""
    await quiet_cluster.flush()
    a, b = (RedisStore.from_url(quiet_cluster.url, cluster=True) for _ in range(2))
    try:
        ha, hb = RedisHistory.of(a, interval=3600.0), RedisHistory.of(b, interval=3600.0)
        for n, pid in enumerate(["p", "q", "r", "s"]):  # peers in several shards
            await a.register(PeerRegistration(id=pid, upload_addr=f"10.0.0.{n + 1}:65002"))
            await b.heartbeat(pid, Heartbeat(counters=PeerCounters(origin=5, peer=7, local=1,
                                                                    served=13)))
        taken = await asyncio.gather(ha.sample(), hb.sample())
        assert sorted(taken) == [False, True]
        (only,) = await ha.samples()
        assert await hb.samples() == [only]
        assert (only.origin, only.peer, only.local, only.served) == (20, 28, 4, 52)
        assert (await b.counters())["served"] == 52
    finally:
        await a.close()
        await b.close()


async def test_a_fresh_store_on_a_cluster_takes_concurrent_first_calls(
        quiet_cluster: RedisCluster) -> None:
    """Many calls at once on a client that has not yet learnt the cluster's map of slots (a
    replica just started, under load): redis-py learning it from each of them closed
    connections the others were using."""
    await quiet_cluster.flush()
    store = RedisStore.from_url(quiet_cluster.url, cluster=True)
    regs = iter(PeerRegistration(id=f"peer-{n}", upload_addr=f"10.0.{n >> 8}.{n & 255}:65002")
                for n in range(1000))

    async def worker() -> None:
        for reg in regs:
            await store.register(reg)
    try:
        await asyncio.gather(*(worker() for _ in range(32)))
        assert len(await store.peers()) == 1000
    finally:
        await store.close()


def _task_key(digest: str) -> str:
    return f"naiad:task:{{{digest}}}"


async def _view(scheduler: str, digest: str) -> tuple[int, dict | None]:
    async with member_session() as s, s.get(f"{scheduler}/api/v1/tasks/{digest}") as r:
        return r.status, (await r.json() if r.status == 200 else None)


def _chunks(view: dict) -> dict[int, str | None]:
    return {p["index"]: p["chunk"] for p in view["piece_map"]}


async def test_master_of_the_tasks_slot_killed_mid_distribution(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        redis_cluster: RedisCluster) -> None:
    # Two blobs whose tasks live on the same master: one distributed before the failure, one
    # during it.
    during = os.urandom(32 * MiB)
    during_digest = "sha256:" + hashlib.sha256(during).hexdigest()
    victim = redis_cluster.master_of(_task_key(during_digest))
    while True:
        before = os.urandom(4 * MiB)
        before_digest = "sha256:" + hashlib.sha256(before).hexdigest()
        if redis_cluster.master_of(_task_key(before_digest)) is victim:
            break
    assert await push_blob(registry.url, repo, before) == before_digest
    assert await push_blob(registry.url, repo, during) == during_digest

    sched = await cluster.scheduler("--redis-cluster", redis_cluster.url)
    peers = await asyncio.gather(*(cluster.peer(f"peer-{i}", sched.url, origin.url)
                                   for i in range(4)))
    first = asyncio.Event()
    assert await asyncio.gather(*(_pull(f"{p.url}/v2/{repo}/blobs/{before_digest}", 0, first)
                                  for p in peers[:2])) == [before_digest] * 2

    async def mapped() -> bool:
        _, view = await _view(sched.url, before_digest)
        return view is not None and None not in _chunks(view).values() \
            and view["complete_holders"] == 2
    await until(mapped, 20, "the first blob's map complete, both holders announced")
    _, sealed_view = await _view(sched.url, before_digest)
    assert sealed_view is not None
    sealed_map = _chunks(sealed_view)

    quarter = asyncio.Event()
    pulls = [asyncio.create_task(_pull(f"{p.url}/v2/{repo}/blobs/{during_digest}", 8 * MiB,
                                       quarter)) for p in peers]
    await _reached(quarter, pulls)
    victim.proc.kill()
    killed = time.monotonic()

    # The scheduler, asked all along: 503 until the replica is promoted, then answers.
    statuses: list[tuple[float, int]] = []
    while True:
        status, _ = await _view(sched.url, during_digest)
        statuses.append((time.monotonic() - killed, status))
        if status == 200 and any(s != 200 for _, s in statuses):
            break  # answered again after the outage
        if status == 200 and all(p.done() for p in pulls):
            break  # never saw the outage: fine, as long as all is well
        assert time.monotonic() - killed < PROMOTION_BOUND, statuses[-5:]
        await asyncio.sleep(0.05)
    assert {s for _, s in statuses} <= {200, 503}, statuses
    recovered = statuses[-1][0]
    assert recovered < PROMOTION_BOUND

    assert await asyncio.wait_for(asyncio.gather(*pulls), 120) == [during_digest] * 4
    for survivor in redis_cluster.alive():
        redis_cluster.wait_ok(survivor)
    assert redis_cluster.master_of(_task_key(during_digest)) is not victim  # promoted

    status, view = await _view(sched.url, before_digest)
    assert status == 200 and view is not None
    assert _chunks(view) == sealed_map  # the map made before the failure, whole

    async def everyone_holds() -> bool:
        _, view = await _view(sched.url, during_digest)
        return view is not None and view["complete_holders"] == 4 \
            and None not in _chunks(view).values()
    await until(everyone_holds, 30, "every peer announced the whole second blob")
    print(f"failover: answers again {recovered:.2f} s after the kill; "
          f"{sum(1 for _, s in statuses if s == 503)} answers were 503")


@pytest.mark.parametrize("args", [
    ["--redis-cluster", "127.0.0.1:7000"],  # not a URL
    ["--redis-cluster", "unix:///run/redis.sock"],  # a cluster is reached over TCP
    ["--redis", "redis://127.0.0.1:6379", "--redis-cluster", "redis://127.0.0.1:7000"],
])
def test_a_redis_cluster_mistake_is_one_line(args: list[str]) -> None:
    done = subprocess.run(naiad("scheduler", "--listen", "127.0.0.1:0", "--udp", "off", *args),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("naiad scheduler: ") and "redis" in line, line


async def test_an_unreachable_cluster_is_no_mistake(tmp_path: Path) -> None:
    """Like --redis: the scheduler starts, answers 503 where it needs the store, and says
    why in its log."""
    port, seed = free_port(), free_port()
    proc = spawn("scheduler", naiad("scheduler", "--listen", f"127.0.0.1:{port}", "--udp",
                                    "off", "--redis-cluster", f"redis://127.0.0.1:{seed}"),
                 tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/healthy", proc=proc)
        async with member_session() as s, s.get(f"{url}/api/v1/stats") as r:
            assert r.status == 503
        await until(lambda: _logged(proc.logs(), f"127.0.0.1:{seed}"), 10, "a warning")
        assert "Traceback" not in proc.logs()
    finally:
        proc.stop()


async def _logged(logs: str, what: str) -> bool:
    return any("WARNING" in line and what in line for line in logs.splitlines())


async def test_wake_ups_between_replicas_outlive_the_feeds_node(
        redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica hears the others' changes on one subscriber connection to one node. That node
    killed (a master: its replica is promoted), the feed subscribes again on another node, and
    a long poll parked on it is woken by an announcement on another replica, not by the
    periodic re-decision (made longer than the test)."""
    monkeypatch.setattr(store_module, "RECHECK_SECONDS", 60.0)
    a, b = (RedisStore.from_url(redis_cluster.url, cluster=True, heartbeat_interval=60.0,
                                lease_timeout=30.0) for _ in range(2))
    try:
        for s in (a, b):
            await s.start()
            await asyncio.wait_for(s.subscribed.wait(), 10)
        for pid in ("H", "R"):
            await a.register(PeerRegistration(id=pid, upload_addr=f"127.0.0.1:{free_port()}"))
        await a.ensure_task(TaskRequest(task_id=TASK, length=2 * MiB, piece_size=MiB))
        assert [d.action for d in await a.schedule(
            ScheduleRequest(peer_id="H", task_id=TASK, pieces=[0]))] == ["source"]
        listening = a.feed._pubsub.connection  # the node the feed of `a` is on
        victim = next(n for n in redis_cluster.nodes if n.port == listening.port)
        assert redis.Redis(port=victim.port).role()[0] == b"master"  # the first node: a master
        victim.proc.kill()
        async def lost() -> bool:
            return not a.subscribed.is_set()
        await until(lost, 10, "the feed lost with its node")
        await asyncio.wait_for(a.subscribed.wait(), PROMOTION_BOUND)
        for survivor in redis_cluster.alive():
            redis_cluster.wait_ok(survivor)

        async def poll() -> list[Decision]:
            while True:  # until the cluster answers (a 503 for the API meanwhile)
                try:
                    return await a.schedule(ScheduleRequest(
                        peer_id="R", task_id=TASK, pieces=[0], wait_ms=20_000))
                except RedisError:
                    await asyncio.sleep(0.1)
        parked = asyncio.create_task(poll())
        async def waiting() -> bool:
            return a.waiters.waiting(TASK) > 0
        await until(waiting, PROMOTION_BOUND, "R's poll parked")
        started = time.monotonic()
        await b.announce(Announce(peer_id="H", task_id=TASK, pieces=[
            PieceClaim(index=0, chunk="blake3:" + "0" * 64)]))
        (d,) = await asyncio.wait_for(parked, 10)
        assert d.action == "parents" and [p.id for p in d.parents] == ["H"], d
        assert time.monotonic() - started < 5.0
    finally:
        await a.close()
        await b.close()
