"""The core promise, end to end with real processes: many peers pull one blob at once, every
copy is exact, and the registry sends it about once."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp

from tests.cluster import Cluster, CountingProxy, Registry, metric, push_blob

MiB = 1 << 20


async def _pull(url: str) -> tuple[str, dict]:
    h = hashlib.sha256()
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        async for chunk in r.content.iter_chunked(1 << 20):
            h.update(chunk)
        return "sha256:" + h.hexdigest(), dict(r.headers)


async def test_four_peers_pull_64mib_at_once_registry_serves_it_about_once(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(64 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peers = await asyncio.gather(*(
        cluster.peer(f"peer-{i}", sched.url, origin.url) for i in range(4)))
    before = origin.bytes_down

    results = await asyncio.gather(*(
        _pull(f"{p.url}/v2/{repo}/blobs/{digest}") for p in peers))

    assert [r[0] for r in results] == [digest] * 4
    sent = origin.bytes_down - before
    assert sent <= 1.1 * len(blob), f"registry sent {sent / len(blob):.2f}x the blob"
    sources = sorted(r[1]["X-Naiad-Source"] for r in results)
    assert "peer" in sources or "mixed" in sources, sources
    from_peers = sum([await metric(p.url, "naiad_peer_download_bytes_total",
                                   {"source": "peer"}) for p in peers])
    assert from_peers >= 2 * len(blob), "most bytes should have moved between peers"


async def test_concurrent_readers_on_one_peer_fetch_each_piece_once(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """In-peer single flight: eight clients of one peer, one copy from the registry."""
    blob = os.urandom(16 * MiB + 5)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    before = origin.bytes_down
    results = await asyncio.gather(*(
        _pull(f"{peer.url}/v2/{repo}/blobs/{digest}") for _ in range(8)))
    assert [r[0] for r in results] == [digest] * 8
    assert origin.bytes_down - before <= 1.1 * len(blob)
    assert await metric(peer.url, "naiad_peer_served_bytes_total") == 8 * len(blob)
