"""Storage under stress, with real peers: a disk quota, a disk that fills up, chunks that rot
on disk, a peer killed while writing. Nothing verified is lost, nothing wrong is served."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.cluster import Cluster, CountingProxy, Registry, member_session, metric, push_blob, until

MiB = 1 << 20


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[bytes, dict]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        assert r.status in (200, 206), await r.text()
        return await r.read(), dict(r.headers)


async def _held_pieces(scheduler: str, task_id: str, peer_id: str, count: int) -> bool:
    """Whether the scheduler lists `peer_id` as the holder of exactly `count` pieces."""
    async with member_session() as s, s.get(f"{scheduler}/api/v1/tasks/{task_id}") as r:
        task = await r.json()
    return sum(peer_id in p["holders"] for p in task["piece_map"]) == count


def _chunk_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "chunks").glob("*/*") if p.is_file())


def _rot(path: Path) -> None:
    """Flip one byte in place, as a failing disk would: same size, wrong bytes."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


async def test_disk_quota_evicts_least_recently_used(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blobs = [os.urandom(4 * MiB) for _ in range(3)]
    digests = [await push_blob(registry.url, repo, b) for b in blobs]
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url, "--disk-quota", "10MiB",
                              "--no-prefetch")
    for digest, blob in zip(digests, blobs, strict=True):
        body, _ = await _get(f"{peer.url}/v2/{repo}/blobs/{digest}")
        assert body == blob
        assert await metric(peer.url, "naiad_peer_cache_bytes") <= 10 * MiB
    # The first blob was the least recently used: evicted, and the scheduler told so.
    await until(lambda: _held_pieces(sched.url, digests[0], "p", 0),
                what="the evicted task withdrawn at the scheduler")
    # Fetched again; the last is local.
    body, headers = await _get(f"{peer.url}/v2/{repo}/blobs/{digests[0]}")
    assert body == blobs[0] and headers["X-Naiad-Source"] != "local"
    body, headers = await _get(f"{peer.url}/v2/{repo}/blobs/{digests[2]}")
    assert body == blobs[2] and headers["X-Naiad-Source"] == "local"


async def test_full_disk_streams_through_without_caching(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    data = tmp_path / "small-disk"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(data)], check=True)
    try:
        blob = os.urandom(10 * MiB + 3)
        digest = await push_blob(registry.url, repo, blob)
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, origin.url, "--data-dir", str(data),
                                  "--no-prefetch")
        for _ in range(2):
            body, _ = await _get(f"{peer.url}/v2/{repo}/blobs/{digest}")
            assert body == blob
        body, _ = await _get(f"{peer.url}/v2/{repo}/blobs/{digest}",
                             {"Range": "bytes=9000000-9999999"})
        assert body == blob[9000000:10000000]
        assert "disk full" in peer.proc.logs()
    finally:
        cluster.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)


async def test_rotten_chunks_never_reach_clients_or_children(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(6 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a = await cluster.peer("a", sched.url, origin.url, "--scrub-rate", "0")
    body, _ = await _get(f"{a.url}/v2/{repo}/blobs/{digest}")
    assert body == blob
    files = _chunk_files(cluster.workdir / "a")
    assert len(files) == 6
    _rot(files[0])
    _rot(files[1])

    # Its own client: the rotten chunks are re-hashed on the way out, dropped, fetched again.
    body, _ = await _get(f"{a.url}/v2/{repo}/blobs/{digest}")
    assert body == blob
    assert await metric(a.url, "naiad_peer_verify_failures_total") >= 2

    # A child: a is the only holder of chunks that rot now; b verifies, reports, refetches.
    for f in _chunk_files(cluster.workdir / "a")[2:4]:
        _rot(f)
    b = await cluster.peer("b", sched.url, origin.url)
    body, _ = await _get(f"{b.url}/v2/{repo}/blobs/{digest}")
    assert body == blob
    assert await metric(b.url, "naiad_peer_verify_failures_total") >= 1


async def test_scrubber_finds_rot_nobody_reads(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(3 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url, "--scrub-rate", "1G")
    await _get(f"{peer.url}/v2/{repo}/blobs/{digest}")
    _rot(_chunk_files(cluster.workdir / "p")[1])

    async def found() -> bool:
        return await metric(peer.url, "naiad_peer_verify_failures_total") >= 1
    await until(found, 30, "the scrubber finding the rotten chunk")
    assert len(_chunk_files(cluster.workdir / "p")) == 2
    await until(lambda: _held_pieces(sched.url, digest, "p", 2),
                what="the rotten piece withdrawn at the scheduler")
    body, _ = await _get(f"{peer.url}/v2/{repo}/blobs/{digest}")
    assert body == blob


async def test_peer_killed_mid_write_serves_only_verified_chunks(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(48 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url, "--no-prefetch")
    data = cluster.workdir / "p"

    async def pull() -> None:
        try:
            async with aiohttp.ClientSession() as s, \
                    s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
                async for _ in r.content.iter_chunked(1 << 20):
                    pass
        except aiohttp.ClientError:
            pass  # the peer dies under it

    puller = asyncio.create_task(pull())

    async def some_stored() -> bool:
        return len(_chunk_files(data)) >= 8
    await until(some_stored, 30, "pieces stored")
    peer.proc.kill()
    await puller
    # Tear one chunk as a crash mid-write would, and leave a half-written temp file.
    victim = _chunk_files(data)[0]
    with open(victim, "r+b") as f:
        f.truncate(1000)
    (data / "tmp" / "crashed.part").write_bytes(os.urandom(5000))

    await cluster.restart(peer)
    body, _ = await _get(f"{peer.url}/v2/{repo}/blobs/{digest}")
    assert body == blob
    peer.proc.stop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", "check-store", "--data-dir", str(data),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert "48 pieces checked, 0 dropped" in out.decode()
