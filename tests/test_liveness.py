"""Liveness: a peer that dies without a word is expired within three heartbeat intervals and its
pieces are never handed out again; heartbeats travel over UDP and fall back to HTTP."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp

from tests.cluster import Cluster, CountingProxy, Registry, metric, push_blob, until

MiB = 1 << 20
INTERVAL = 0.5  # tests/cluster.py starts schedulers with --heartbeat-interval 0.5


async def _peer_ids(scheduler: str) -> set[str]:
    async with aiohttp.ClientSession() as s, s.get(f"{scheduler}/api/v1/peers") as r:
        return {p["id"] for p in (await r.json())["peers"]}


async def test_killed_peer_expires_within_three_intervals_and_is_never_handed_out(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(4 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a, b = await asyncio.gather(cluster.peer("a", sched.url, origin.url),
                                cluster.peer("b", sched.url, origin.url))
    async with aiohttp.ClientSession() as s, s.get(f"{a.url}/v2/{repo}/blobs/{digest}") as r:
        assert await r.read() == blob

    a.proc.kill()
    killed = time.monotonic()

    async def gone() -> bool:
        return "a" not in await _peer_ids(sched.url)
    await until(gone, 10, "the killed peer leaving the list")
    took = time.monotonic() - killed
    # Expired after 3 silent intervals, noticed by an expiry pass every half interval.
    assert took <= 3 * INTERVAL + INTERVAL / 2 + 0.5, f"{took:.2f} s"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
            task = await r.json()
        assert all("a" not in p["holders"] for p in task["piece_map"])
        async with s.get(f"{b.url}/v2/{repo}/blobs/{digest}") as r:
            assert await r.read() == blob
    # b was never sent to the dead peer: nothing from peers, nothing failed, all from origin.
    assert await metric(b.url, "naiad_peer_download_bytes_total", {"source": "peer"}) == 0
    assert await metric(b.url, "naiad_peer_download_bytes_total",
                        {"source": "origin"}) == len(blob)
    assert "a" not in await _peer_ids(sched.url)
