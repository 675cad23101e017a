"""Loopback distribution benchmark: N clients pull one blob at once, straight from the registry
and through N naiad peers (one client per peer), with curl as the client.

Reports, per mode, the median over --runs of: the time until the last client has the whole blob,
and the registry's egress as a multiple of the blob (counted by a TCP front before the registry).
Every copy's sha256 is checked. On loopback the links are not shaped, so this measures naiad's
own overhead and its origin discipline, not a network; bench/swarm (issue 7) is the shaped lab.

    python bench/distribution.py --peers 4 --size 64 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import Cluster, CountingProxy, Registry, push_blob

MiB = 1 << 20
# Copies land in memory when possible, so the disk does not time curl.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None


async def _curl_all(urls: list[str], outdir: Path) -> float:
    started = time.perf_counter()
    procs = [await asyncio.create_subprocess_exec(
        "curl", "-sf", "-o", str(outdir / f"{i}.bin"), url) for i, url in enumerate(urls)]
    codes = [await p.wait() for p in procs]
    elapsed = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"curl failed: {codes}")
    return elapsed


def _check(outdir: Path, n: int, digest: str) -> None:
    for i in range(n):
        got = "sha256:" + hashlib.sha256((outdir / f"{i}.bin").read_bytes()).hexdigest()
        if got != digest:
            raise RuntimeError(f"copy {i} is {got}, expected {digest}")
        (outdir / f"{i}.bin").unlink()


async def run(peers: int, size: int, runs: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "naiad": []}
    with tempfile.TemporaryDirectory(prefix="naiad-bench-") as tmp:
        work = Path(tmp)
        outdir = Path(tempfile.mkdtemp(dir=SCRATCH or tmp))
        registry = Registry(work / "registry")
        await registry.ready()
        front = CountingProxy(registry.port)
        await front.start()
        try:
            for r in range(runs):
                blob = os.urandom(size)
                digest = await push_blob(registry.url, f"bench/run{r}", blob)
                url = f"/v2/bench/run{r}/blobs/{digest}"

                before = front.bytes_down
                elapsed = await _curl_all([front.url + url] * peers, outdir)
                results["direct"].append((elapsed, (front.bytes_down - before) / size))
                _check(outdir, peers, digest)

                cluster = Cluster(work / f"cluster{r}")
                (work / f"cluster{r}").mkdir()
                try:
                    sched = await cluster.scheduler()
                    nodes = await asyncio.gather(*(
                        cluster.peer(f"peer{i}", sched.url, front.url) for i in range(peers)))
                    before = front.bytes_down
                    elapsed = await _curl_all([n.url + url for n in nodes], outdir)
                    results["naiad"].append((elapsed, (front.bytes_down - before) / size))
                    _check(outdir, peers, digest)
                finally:
                    cluster.stop()
                print(f"run {r + 1}: direct {results['direct'][-1][0]:.2f} s "
                      f"{results['direct'][-1][1]:.2f}x, naiad {results['naiad'][-1][0]:.2f} s "
                      f"{results['naiad'][-1][1]:.2f}x", file=sys.stderr)
        finally:
            await front.stop()
            registry.stop()
            shutil.rmtree(outdir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="blob size in MiB")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = asyncio.run(run(args.peers, args.size * MiB, args.runs))
    print(f"# {args.peers} clients, {args.size} MiB blob, median of {args.runs} runs; "
          f"{platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("| mode | time to last copy | registry egress |")
    print("|---|---|---|")
    for mode, rows in results.items():
        t = statistics.median(x[0] for x in rows)
        e = statistics.median(x[1] for x in rows)
        print(f"| {mode} | {t:.2f} s | {e:.2f}x |")
    ratio = statistics.median(results["naiad"][i][0] / results["direct"][i][0]
                              for i in range(args.runs))
    print(f"\nnaiad/direct time ratio (median of per-run ratios): {ratio:.2f}")


if __name__ == "__main__":
    main()
