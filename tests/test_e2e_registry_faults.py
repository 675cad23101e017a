"""A registry that fails: blob GETs answered 503, a body that hangs halfway, bodies that
trickle. Every pull still completes with the exact bytes, in bounded time, and the registry's
egress stays bounded."""

from __future__ import annotations

import asyncio
import os

import aiohttp

from peer.origin import ORIGIN_STALL_SECONDS
from tests.cluster import Cluster, Registry, push_blob
from tests.faults import FlakyRegistry

MiB = 1 << 20


async def _pull(url: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.read()


async def test_registry_503s_are_retried(cluster: Cluster, registry: Registry,
                                          repo: str) -> None:
    blob = os.urandom(5 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    async with FlakyRegistry(registry.url, fail=2) as flaky:
        sched = await cluster.scheduler()
        a, b = await asyncio.gather(cluster.peer("a", sched.url, flaky.url),
                                    cluster.peer("b", sched.url, flaky.url))
        path = f"/v2/{repo}/blobs/{digest}"
        assert await asyncio.gather(_pull(a.url + path), _pull(b.url + path)) == [blob, blob]
    assert flaky.failed == 2
    assert flaky.blob_bytes <= 1.1 * len(blob), flaky.blob_bytes / len(blob)


async def test_a_registry_that_hangs_mid_body_is_abandoned(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    blob = os.urandom(4 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    async with FlakyRegistry(registry.url, stall=1) as flaky:
        sched = await cluster.scheduler()
        a = await cluster.peer("a", sched.url, flaky.url)
        started = asyncio.get_running_loop().time()
        assert await _pull(f"{a.url}/v2/{repo}/blobs/{digest}") == blob
        took = asyncio.get_running_loop().time() - started
    assert flaky.stalled == 1
    # Abandoned after ORIGIN_STALL_SECONDS without a byte, then fetched again: bounded.
    assert took < ORIGIN_STALL_SECONDS + 20, took


async def test_a_trickling_registry_is_not_fetched_twice(cluster: Cluster, registry: Registry,
                                                         repo: str) -> None:
    blob = os.urandom(6 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    async with FlakyRegistry(registry.url, rate=2 * MiB) as flaky:  # 3 s for the blob
        sched = await cluster.scheduler()
        nodes = await asyncio.gather(*(cluster.peer(f"p{i}", sched.url, flaky.url)
                                       for i in range(3)))
        path = f"/v2/{repo}/blobs/{digest}"
        results = await asyncio.gather(*(_pull(n.url + path) for n in nodes))
    assert results == [blob] * 3
    # The lease holder's slow run keeps reporting progress, so nobody takes it over.
    assert flaky.blob_bytes <= 1.1 * len(blob), flaky.blob_bytes / len(blob)


async def test_a_registry_body_cut_short_reaches_the_client_broken(cluster: Cluster) -> None:
    """A manifest relayed as the registry sends it, whose body the registry cuts off: the
    client sees a broken body (never a short one that looks whole), the peer one log line and
    no traceback, and the peer keeps relaying."""
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + b"{" * 100_000)
        await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    try:
        upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, upstream)
        for _ in range(2):
            async with aiohttp.ClientSession() as s, \
                    s.get(f"{peer.url}/v2/library/x/manifests/latest") as r:
                assert r.status == 200
                try:
                    body = await r.read()
                except aiohttp.ClientPayloadError:
                    continue
                raise AssertionError(f"a cut body read whole: {len(body)} bytes")
        logs = peer.proc.logs()
        assert "Traceback" not in logs and "Error handling request" not in logs, logs
        assert "cut off" in logs, logs
    finally:
        server.close()
        await server.wait_closed()
