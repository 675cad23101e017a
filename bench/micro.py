"""Loopback microbenchmarks (issues 6 and 7), each against a baseline measured in the same run.

- p2p: one piece stream between two peers: a cold pull through peer B of a blob that peer A
  holds (received from A, verified, stored, served), in MB/s.
- warm: a peer serving a blob it holds to curl through its mirror, with and without
  --verify-on-serve, against curl from the registry directly.
- nydus: nydusd-pattern random reads (128 KiB-1 MiB, unaligned): time to first byte cold, p50 and
  p99 latency warm, against the same reads from the registry directly.
- rss: the peer's resident memory while it streams a large blob (cold), sampled every 50 ms.

    python bench/micro.py --size 256 --runs 3 [--rss-size 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loopback import curl_seconds, push_file, rss_kib
from tests.cluster import Cluster, Node, Registry, push_blob

MiB = 1 << 20


async def range_latencies(url: str, size: int, n: int, seed: int) -> tuple[float, list[float]]:
    """(time to first byte of the first read, latency of each read)."""
    rng = random.Random(seed)
    latencies: list[float] = []
    ttfb = 0.0
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            length = rng.randint(128 << 10, MiB)
            offset = rng.randrange(0, size - length)
            started = time.perf_counter()
            async with s.get(url, headers={"Range": f"bytes={offset}-{offset + length - 1}",
                                           "X-Dragonfly-Priority": "6"}) as r:
                first = await r.content.read(1)
                if i == 0:
                    ttfb = time.perf_counter() - started
                rest = await r.read()
                assert len(first) + len(rest) == length
            latencies.append(time.perf_counter() - started)
    return ttfb, latencies


def rss_mb(pid: int) -> float:
    return rss_kib(pid) / 1024


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_run(work: Path, registry: Registry, size: int, run: int) -> dict[str, float]:
    out: dict[str, float] = {}
    blob = os.urandom(size)
    repo = f"bench/micro{run}"
    digest = await push_blob(registry.url, repo, blob)
    path = f"/v2/{repo}/blobs/{digest}"
    cluster = Cluster(work / f"c{run}")
    (work / f"c{run}").mkdir()
    try:
        sched = await cluster.scheduler()
        a, b, plain, n1 = await asyncio.gather(
            cluster.peer("a", sched.url, registry.url, "--scrub-rate", "0"),
            cluster.peer("b", sched.url, registry.url, "--scrub-rate", "0"),
            cluster.peer("plain", sched.url, registry.url, "--scrub-rate", "0",
                         "--no-verify-on-serve"),
            cluster.peer("nydus", sched.url, registry.url, "--scrub-rate", "0",
                         "--no-prefetch"))
        out["registry_curl_MBps"] = size / await curl_seconds(registry.url + path) / 1e6
        out["a_cold_from_origin_MBps"] = size / await curl_seconds(a.url + path) / 1e6
        out["p2p_b_cold_from_a_MBps"] = size / await curl_seconds(b.url + path) / 1e6
        out["warm_verify_MBps"] = size / await curl_seconds(a.url + path) / 1e6
        await curl_seconds(plain.url + path)  # fill its store
        out["warm_no_verify_MBps"] = size / await curl_seconds(plain.url + path) / 1e6
        out["registry_curl_MBps_again"] = size / await curl_seconds(registry.url + path) / 1e6

        ttfb, lat = await range_latencies(registry.url + path, size, 60, run)
        out["nydus_registry_ttfb_ms"] = 1000 * ttfb
        out["nydus_registry_p50_ms"] = 1000 * pct(lat, 0.5)
        out["nydus_registry_p99_ms"] = 1000 * pct(lat, 0.99)
        # Cold: the peer holds nothing of a second blob; warm: the same reads again.
        blob2 = os.urandom(size)
        digest2 = await push_blob(registry.url, repo, blob2)
        path2 = f"/v2/{repo}/blobs/{digest2}"
        ttfb, _ = await range_latencies(n1.url + path2, size, 60, run)
        out["nydus_peer_cold_ttfb_ms"] = 1000 * ttfb
        _, lat = await range_latencies(n1.url + path2, size, 60, run)
        out["nydus_peer_warm_p50_ms"] = 1000 * pct(lat, 0.5)
        out["nydus_peer_warm_p99_ms"] = 1000 * pct(lat, 0.99)
    finally:
        cluster.stop()
    return out


async def rss_run(work: Path, registry: Registry, size: int) -> dict[str, float]:
    """Peak RSS of a peer streaming a blob of `size` bytes cold to curl."""
    blob_path = work / "big.bin"
    with open(blob_path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    import hashlib
    h = hashlib.sha256()
    with open(blob_path, "rb") as f:
        while part := f.read(64 * MiB):
            h.update(part)
    digest = "sha256:" + h.hexdigest()
    await push_file(registry.url, "bench/big", blob_path, digest)
    blob_path.unlink()
    cluster = Cluster(work / "rss")
    (work / "rss").mkdir()
    try:
        sched = await cluster.scheduler()
        peer: Node = await cluster.peer("p", sched.url, registry.url, "--scrub-rate", "0")
        pid = peer.proc.popen.pid
        idle = rss_mb(pid)
        peak = idle
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        seconds = await curl_seconds(f"{peer.url}/v2/bench/big/blobs/{digest}")
        done.set()
        await sampler
        return {"rss_idle_MB": idle, "rss_peak_MB": peak, "rss_blob_MB": size / MiB,
                "rss_stream_MBps": size / seconds / 1e6}
    finally:
        cluster.stop()


async def main(size: int, runs: int, rss_size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="naiad-micro-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        await registry.ready()
        try:
            results = [await one_run(work, registry, size, r) for r in range(runs)]
            rss = await rss_run(work, registry, rss_size) if rss_size else {}
        finally:
            registry.stop()
    print(f"# bench/micro.py --size {size >> 20} --runs {runs} --rss-size {rss_size >> 20}; "
          f"{platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("| measure | median | runs |")
    print("|---|---|---|")
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"| {key} | {statistics.median(values):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")
    for key, value in rss.items():
        print(f"| {key} | {value:.1f} | 1 |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="blob MiB for the runs")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rss-size", type=int, default=2048, help="MiB; 0 skips")
    args = parser.parse_args()
    asyncio.run(main(args.size * MiB, args.runs, args.rss_size * MiB))
