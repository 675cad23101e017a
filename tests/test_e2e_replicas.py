"""Issue 4, acceptance test 2: stateless scheduler replicas over one Redis. Two
`naiad scheduler --redis` replicas, four peers given both; the replica the peers use is killed
(SIGKILL) in the middle of a 64 MiB distribution. Every pull completes with the right sha256,
and the registry still serves the blob about once."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    pull_digest,
    push_blob,
    spawn,
    until,
)
from tests.test_store_behaviour import RedisServer

MiB = 1 << 20


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


async def _kill_the_replica_in_use(cluster: Cluster, registry: Registry,
                                   origin: CountingProxy, repo: str, redis_url: str
                                   ) -> tuple[list[str], str, float]:
    """Run the scenario; the pulls' digests, the blob's, and what the registry sent (x blob)."""
    blob = os.urandom(64 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    a = await cluster.scheduler("--redis", redis_url, name="scheduler-a")
    b = await cluster.scheduler("--redis", redis_url, name="scheduler-b")
    peers = await asyncio.gather(*(
        cluster.peer(f"peer-{i}", a.url, origin.url, "--scheduler", b.url) for i in range(4)))
    # They registered with a, the first URL given; the shared state shows them through b too.
    async with aiohttp.ClientSession() as s, s.get(f"{b.url}/api/v1/peers") as r:
        assert sorted(p["id"] for p in (await r.json())["peers"]) == [p.name for p in peers]
    before = origin.bytes_down

    pulls = [asyncio.create_task(pull_digest(f"{p.url}/v2/{repo}/blobs/{digest}")) for p in peers]
    # In the middle: some of the blob's 64 pieces are held somewhere, not all.
    while (held := await _pieces_held(b.url, digest)) < 8:
        assert not any(t.done() for t in pulls), "the pulls finished before the kill"
        await asyncio.sleep(0.02)
    assert held < 64, "too late to kill mid-distribution"
    a.proc.kill()

    results = await asyncio.wait_for(asyncio.gather(*pulls), 120)
    return results, digest, (origin.bytes_down - before) / len(blob)


async def test_every_pull_completes_when_the_replica_in_use_is_killed(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        redis_url: str) -> None:
    results, digest, _ = await _kill_the_replica_in_use(cluster, registry, origin, repo,
                                                        redis_url)
    assert results == [digest] * 4


async def test_registry_serves_the_blob_about_once_when_the_replica_in_use_is_killed(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        redis_url: str) -> None:
    results, digest, sent = await _kill_the_replica_in_use(cluster, registry, origin, repo,
                                                           redis_url)
    assert results == [digest] * 4
    assert sent <= 1.1, f"registry sent {sent:.2f}x the blob"


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
        pulls = [asyncio.create_task(pull_digest(f"{p.url}/v2/{repo}/blobs/{digest}"))
                 for p in peers]
        while await _pieces_held(sched.url, digest) < 4:
            assert not any(t.done() for t in pulls), "the pulls finished before the restart"
            await asyncio.sleep(0.02)
        server.proc.kill()
        server.proc.popen.wait()
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
