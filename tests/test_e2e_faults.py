"""Degraded modes: a parent serving corrupt bytes, a scheduler that is down or restarts, a peer
that restarts."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
from aiohttp import web

from common import ids
from common.pieces import PieceLayout, default_piece_size
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    free_port,
    member_session,
    metric,
    push_blob,
    until,
    wait_registered_peer,
)
from tests.faults import CorruptParent, FakePeer

MiB = 1 << 20


async def _pull(url: str) -> tuple[bytes, dict]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.read(), dict(r.headers)


async def test_corrupt_parent_never_reaches_a_client(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(5 * MiB + 17)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a, b = await asyncio.gather(cluster.peer("a", sched.url, origin.url),
                                cluster.peer("b", sched.url, origin.url))
    async with CorruptParent(sched.url, blob, digest) as bad:
        body, _ = await _pull(f"{a.url}/v2/{repo}/blobs/{digest}")
        assert body == blob
        assert bad.requests >= 1, "the corrupt parent was never tried"
        assert await metric(a.url, "naiad_peer_verify_failures_total") >= 1
        async with aiohttp.ClientSession() as s, \
                s.get(f"{sched.url}/api/v1/peers/corrupt") as r:
            view = await r.json()
        assert view["penalised"] and view["penalty_reason"] == "corrupt"
        # Ranges through the second peer are right too, and it is not sent to the bad parent.
        served_before = bad.requests
        async with aiohttp.ClientSession() as s, \
                s.get(f"{b.url}/v2/{repo}/blobs/{digest}",
                      headers={"Range": "bytes=100-3000000"}) as r:
            assert await r.read() == blob[100:3000001]
        assert bad.requests == served_before


async def test_pulls_succeed_without_scheduler_and_it_relearns_on_return(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(3 * MiB + 5)
    digest = await push_blob(registry.url, repo, blob)
    port = free_port()
    sched_url = f"http://127.0.0.1:{port}"
    peer = await cluster.peer("lonely", sched_url, origin.url, wait_registered=False)

    body, headers = await _pull(f"{peer.url}/v2/{repo}/blobs/{digest}")
    assert body == blob
    assert headers["X-Naiad-Source"] == "origin"
    assert "scheduler-unreachable" in headers["X-Naiad-Origin-Reason"]

    # The scheduler comes up: the peer registers and re-announces what it holds.
    await cluster.scheduler(port=port)
    await wait_registered_peer(sched_url, "lonely")

    async def announced() -> bool:
        async with member_session() as s, \
                s.get(f"{sched_url}/api/v1/tasks/{digest}") as r:
            if r.status != 200:
                return False
            task = await r.json()
        # One peer's word is not a seal (that takes two confirmations): it stays provisional.
        return not task["sealed"] and len(task["piece_map"]) == task["pieces"] \
            and all(p["holders"] == ["lonely"] for p in task["piece_map"])
    await until(announced, what="re-announcement")


async def test_scheduler_killed_mid_cluster_pulls_still_succeed(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(2 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a, b = await asyncio.gather(cluster.peer("a", sched.url, origin.url),
                                cluster.peer("b", sched.url, origin.url))
    body, _ = await _pull(f"{a.url}/v2/{repo}/blobs/{digest}")
    assert body == blob
    sched.proc.kill()
    # b learns nothing new, but a pull must still work, from the origin.
    other = os.urandom(MiB + 3)
    other_digest = await push_blob(registry.url, repo, other)
    body, _ = await _pull(f"{b.url}/v2/{repo}/blobs/{other_digest}")
    assert body == other
    body, _ = await _pull(f"{b.url}/v2/{repo}/blobs/{digest}")
    assert body == blob


async def test_restarted_peer_serves_from_its_store(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(4 * MiB + 1)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    body, _ = await _pull(f"{peer.url}/v2/{repo}/blobs/{digest}")
    assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]

    await cluster.restart(peer)
    before = origin.bytes_down
    body, headers = await _pull(f"{peer.url}/v2/{repo}/blobs/{digest}")
    assert body == blob
    assert headers["X-Naiad-Source"] == "local"
    assert origin.bytes_down - before < 4096, "only the access check may reach the registry"


async def test_stalled_lease_holder_is_taken_over(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """A peer takes the origin lease for every piece and never fetches: after the lease timeout
    (2 s without progress) a real peer takes it over and the pull completes."""
    blob = os.urandom(4 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("real", sched.url, origin.url)
    async with FakePeer(sched.url, "squatter", free_port()) as squatter:
        await squatter.post("/tasks", {"task_id": digest, "length": len(blob)})
        reply = await squatter.post("/schedule", {"peer_id": "squatter", "task_id": digest,
                                                  "pieces": [0, 1, 2, 3]})
        assert {d["action"] for d in reply["decisions"]} == {"source"}
        started = asyncio.get_running_loop().time()
        body, _ = await _pull(f"{peer.url}/v2/{repo}/blobs/{digest}")
        elapsed = asyncio.get_running_loop().time() - started
        task = await squatter.get(f"/tasks/{digest}")
    assert body == blob
    assert 1.0 < elapsed < 8.0, f"took over after {elapsed:.1f} s"
    assert await metric(peer.url, "naiad_peer_download_bytes_total",
                        {"source": "origin"}) == len(blob)
    assert all(p["holders"] == ["real"] for p in task["piece_map"])
    assert {le["holder"] for le in task["leases"]} <= {"real"}


async def test_stalling_parent_is_abandoned(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """A parent that sends headers and a few bytes then nothing is given up on within the
    stall timeout, reported slow, and the piece fetched elsewhere."""
    blob = os.urandom(2 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("real", sched.url, origin.url)
    layout = PieceLayout(len(blob), default_piece_size(len(blob)))
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(layout.piece_size)})
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/chunks/{chunk}", stall)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with FakePeer(sched.url, "staller", port) as staller:
            await staller.post("/tasks", {"task_id": digest, "length": len(blob)})
            claims = [{"index": i, "chunk": ids.chunk_id(blob[i * MiB:(i + 1) * MiB])}
                      for i in range(layout.count)]
            await staller.post("/announce", {"peer_id": "staller", "task_id": digest,
                                             "pieces": claims})
            started = asyncio.get_running_loop().time()
            body, _ = await _pull(f"{peer.url}/v2/{repo}/blobs/{digest}")
            elapsed = asyncio.get_running_loop().time() - started
            async with aiohttp.ClientSession() as s, \
                    s.get(f"{sched.url}/api/v1/peers/staller") as r:
                view = await r.json()
    finally:
        release.set()
        await runner.cleanup()
    assert body == blob
    assert view["penalty_reason"] == "slow"
    assert elapsed < 6.0, f"stalled parent held the pull for {elapsed:.1f} s"


async def test_on_demand_read_does_not_wait_long_for_a_lease_holder(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """DESIGN: an on-demand read (priority 6) that waited ~1 s for a lease holder fetches its
    own covering pieces; nydusd gives up after 5 s, and the lease only lapses after 2 s."""
    blob = os.urandom(4 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("real", sched.url, origin.url, "--no-prefetch")
    async with FakePeer(sched.url, "squatter", free_port()) as squatter:
        await squatter.post("/tasks", {"task_id": digest, "length": len(blob)})
        await squatter.post("/schedule", {"peer_id": "squatter", "task_id": digest,
                                          "pieces": [0, 1, 2, 3]})
        started = asyncio.get_running_loop().time()
        async with aiohttp.ClientSession() as s, s.get(
                f"{peer.url}/v2/{repo}/blobs/{digest}",
                headers={"Range": "bytes=1500000-1600000", "X-Dragonfly-Priority": "6"}) as r:
            body = await r.read()
            reason = r.headers.get("X-Naiad-Origin-Reason", "")
        elapsed = asyncio.get_running_loop().time() - started
    assert body == blob[1500000:1600001]
    assert reason == "on-demand-wait"
    assert 0.9 < elapsed < 1.9, f"{elapsed:.2f} s"
