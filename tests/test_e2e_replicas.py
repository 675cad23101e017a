"""Issue 4, acceptance test 2: stateless scheduler replicas over one Redis. Two
`naiad scheduler --redis` replicas, four peers given both; the replica the peers use is killed
(SIGKILL) in the middle of a 64 MiB distribution. Every pull completes with the right sha256,
and the registry still serves the blob about once. Each fault is triggered by a pull's
progress (bytes read), not by a timer, and each scenario runs once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    metric,
    push_blob,
    spawn,
    until,
)
from tests.redis_servers import RedisServer

MiB = 1 << 20
INTERVAL = 0.5  # tests/cluster.py starts schedulers with --heartbeat-interval 0.5


async def _heartbeats(scheduler: str) -> float:
    """Heartbeats a replica accepted, over UDP and HTTP."""
    return sum([await metric(scheduler, "naiad_scheduler_heartbeats_total",
                             {"transport": t, "result": "accepted"}) for t in ("udp", "http")])


@pytest.fixture(scope="module")
def redis_server_e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-e2e"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_url(redis_server_e2e: RedisServer) -> AsyncIterator[str]:
    client = aioredis.Redis.from_url(redis_server_e2e.url)
    await client.flushall()
    await client.aclose()
    yield redis_server_e2e.url


async def _pieces_held(scheduler: str, task_id: str) -> int:
    async with member_session() as s, s.get(f"{scheduler}/api/v1/tasks/{task_id}") as r:
        if r.status != 200:
            return 0
        view = await r.json()
    return sum(1 for p in view["piece_map"] if p["holders"])


async def _pull(url: str, at: int, reached: asyncio.Event) -> str:
    """GET a blob, streamed; the sha256 of what arrived. Sets `reached` once `at` bytes have:
    the faults below are triggered by a pull's progress, not by a timer."""
    h = hashlib.sha256()
    got = 0
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        async for chunk in r.content.iter_chunked(1 << 20):
            h.update(chunk)
            got += len(chunk)
            if got >= at:
                reached.set()
    return "sha256:" + h.hexdigest()


async def _reached(mark: asyncio.Event, pulls: list[asyncio.Task[str]]) -> None:
    """Until a pull has set `mark`, while every pull is still under way."""
    waiter = asyncio.create_task(mark.wait())
    try:
        await asyncio.wait([waiter, *pulls], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    assert mark.is_set() and not any(t.done() for t in pulls), \
        "a pull ended before the mark was reached: the fault would not be mid-distribution"


@dataclass
class Listing:
    """What polling a replica's /api/v1/peers saw: how often, any poll that missed a peer,
    and the oldest heartbeat age any listed peer had."""

    polls: int = 0
    missing: list[str] = field(default_factory=list)
    oldest: float = 0.0


async def _watch_listing(scheduler: str, names: set[str], stop: asyncio.Event) -> Listing:
    """Poll `scheduler`'s peer list until `stop`, each poll a fresh request."""
    seen = Listing()
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            async with s.get(f"{scheduler}/api/v1/peers") as r:
                assert r.status == 200, await r.text()
                view = (await r.json())["peers"]
            seen.polls += 1
            gone = names - {p["id"] for p in view}
            if gone:
                seen.missing.append(f"{time.monotonic() - started:.2f} s: {sorted(gone)}")
            seen.oldest = max([seen.oldest, *(p["last_heartbeat_age"] for p in view)])
            await asyncio.sleep(0.05)
    return seen


async def test_replica_in_use_killed_mid_distribution_pulls_exact_registry_about_once(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        redis_url: str) -> None:
    """Every pull exact, the registry sends the blob about once, and no live peer ever drops
    out of the survivor's list: each heartbeats (or registers with) b before its record,
    silent since a died, would expire."""
    blob = os.urandom(64 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    a = await cluster.scheduler("--redis", redis_url, name="scheduler-a")
    b = await cluster.scheduler("--redis", redis_url, name="scheduler-b")
    # Four pulling peers and one idle: only its heartbeats tell it a is gone.
    *peers, idle = await asyncio.gather(*(
        cluster.peer(name, a.url, origin.url, "--scheduler", b.url)
        for name in ("peer-0", "peer-1", "peer-2", "peer-3", "idle")))
    live = [*peers, idle]
    # They registered with a, the first URL given; the shared state shows them through b too.
    async with aiohttp.ClientSession() as s, s.get(f"{b.url}/api/v1/peers") as r:
        assert sorted(p["id"] for p in (await r.json())["peers"]) == sorted(p.name for p in live)
    before = origin.bytes_down
    stop_watching = asyncio.Event()
    watcher = asyncio.create_task(_watch_listing(b.url, {p.name for p in live},
                                                 stop_watching))

    # In the middle: once a client has read a quarter of the blob, a is SIGKILLed.
    quarter = asyncio.Event()
    pulls = [asyncio.create_task(_pull(f"{p.url}/v2/{repo}/blobs/{digest}", 16 * MiB, quarter))
             for p in peers]
    await _reached(quarter, pulls)
    held = await _pieces_held(b.url, digest)
    a.proc.kill()
    assert held < 64, "every piece was held before the kill: not mid-distribution"

    results = await asyncio.wait_for(asyncio.gather(*pulls), 120)
    assert results == [digest] * 4
    sent = (origin.bytes_down - before) / len(blob)
    assert sent <= 1.1, f"registry sent {sent:.2f}x the blob"

    # Every peer registered with b; the watch goes on until each has heartbeated it for more
    # than an expiry window (3 intervals) since: a lapse would have shown by then.
    async def all_with_b() -> bool:
        return all(f"registered with scheduler {b.url}" in p.proc.logs() for p in live)
    await until(all_with_b, 20, "every peer registered with the surviving replica")
    beats = await _heartbeats(b.url)

    async def a_window_of_beats() -> bool:
        return await _heartbeats(b.url) >= beats + 4 * len(live)
    await until(a_window_of_beats, 20, "four more heartbeats per peer at b")
    stop_watching.set()
    seen = await watcher
    assert seen.polls >= 20, f"only {seen.polls} polls of b's peer list"
    assert seen.missing == [], f"live peers missing from b's list: {seen.missing}"
    # Failing over costs at most about one interval (an unanswered datagram, HTTP refused,
    # registering with b): far from the 3 intervals after which a record expires.
    assert seen.oldest < 2 * INTERVAL, \
        f"a listed peer went {seen.oldest:.2f} s without a heartbeat (expiry: {3 * INTERVAL} s)"


async def test_redis_restarted_mid_distribution(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    """Redis SIGKILLed and restarted empty (no persistence) while four peers pull: the
    scheduler answers 503 meanwhile, every pull completes exactly, and the peers register and
    announce their holdings again once Redis is back."""
    server = RedisServer(tmp_path / "redis")
    server.wait_ready()
    try:
        blob = os.urandom(32 * MiB)
        digest = await push_blob(registry.url, repo, blob)
        sched = await cluster.scheduler("--redis", server.url)
        peers = await asyncio.gather(*(cluster.peer(f"peer-{i}", sched.url, origin.url)
                                       for i in range(4)))
        # Once a client has read a quarter of the blob, Redis is SIGKILLed.
        quarter = asyncio.Event()
        pulls = [asyncio.create_task(_pull(f"{p.url}/v2/{repo}/blobs/{digest}", 8 * MiB,
                                           quarter)) for p in peers]
        await _reached(quarter, pulls)
        server.proc.kill()
        async with member_session() as s, \
                s.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
            assert r.status == 503, f"with Redis down the scheduler answered {r.status}"
        server.proc = spawn("redis", [server.binary, *server.args], tmp_path / "redis")
        server.wait_ready()
        assert await asyncio.wait_for(asyncio.gather(*pulls), 120) == [digest] * 4

        async def everyone_back() -> bool:
            async with aiohttp.ClientSession() as s, s.get(f"{sched.url}/api/v1/peers") as r:
                if r.status != 200:
                    return False
                listed = {p["id"] for p in (await r.json())["peers"]}
            return listed == {p.name for p in peers} \
                and await _pieces_held(sched.url, digest) == 32
        await until(everyone_back, 30, "peers registered and announced again")
    finally:
        server.stop()
