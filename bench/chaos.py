"""The chaos suite's scenario (tests/test_chaos.py) over many seeds and bigger blobs: N peers
pull one blob at once while some are SIGKILLed at random moments, a fake peer serves corrupt
chunks under true ids, and the scheduler is SIGKILLed and restarted on its port.

Per seed it reports whether every surviving client got the exact blob (checked byte by byte as
it arrived), how many corrupt chunks the fake was asked for and how many the peers caught, and
the registry's egress as a multiple of the blob (a TCP front before the registry counts it).
Exits 1 if any survivor failed or saw a wrong byte.

    python bench/chaos.py --seeds 10 --size 64 --peers 8 --kills 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import Cluster, CountingProxy, Registry, push_blob
from tests.test_chaos import WrongByte, run_chaos

MiB = 1 << 20


async def run(seeds: range, size: int, peers: int, kills: int) -> list[dict]:
    reports = []
    with tempfile.TemporaryDirectory(prefix="naiad-chaos-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        await registry.ready()
        front = CountingProxy(registry.port)
        await front.start()
        try:
            for seed in seeds:
                blob = os.urandom(size)
                repo = f"chaos/seed{seed}"
                digest = await push_blob(registry.url, repo, blob)
                (work / f"seed{seed}").mkdir()
                cluster = Cluster(work / f"seed{seed}")
                started = time.monotonic()
                try:
                    report = await run_chaos(cluster, registry.url, front, repo, blob, digest,
                                             seed, peers=peers, kills=kills)
                except WrongByte as e:
                    report = {"seed": seed, "failures": {"wrong byte": str(e)},
                              "origin_multiple": float("nan"), "corrupt_requests": 0,
                              "verify_failures": 0}
                finally:
                    cluster.stop()
                report["seconds"] = time.monotonic() - started
                reports.append(report)
                print(f"seed {seed}: failures {report['failures'] or 'none'}, registry "
                      f"{report['origin_multiple']:.2f}x, corrupt asked "
                      f"{report['corrupt_requests']}, caught {report['verify_failures']:.0f}, "
                      f"{report['seconds']:.1f} s", file=sys.stderr)
        finally:
            await front.stop()
            registry.stop()
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="seeds 1..N")
    parser.add_argument("--size", type=int, default=64, help="blob size in MiB")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    reports = asyncio.run(run(range(1, args.seeds + 1), args.size * MiB, args.peers,
                              args.kills))
    print(f"# {args.peers} peers, {args.kills} killed, {args.size} MiB, seeds 1-{args.seeds}; "
          f"{platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("| seed | survivors exact | corrupt chunks asked / caught | registry egress |")
    print("|---|---|---|---|")
    for r in reports:
        exact = "all" if not r["failures"] else f"FAILED: {r['failures']}"
        print(f"| {r['seed']} | {exact} | {r['corrupt_requests']} / "
              f"{r['verify_failures']:.0f} | {r['origin_multiple']:.2f}x |")
    egress = [r["origin_multiple"] for r in reports if not r["failures"]]
    if egress:
        print(f"\nregistry egress: median {statistics.median(egress):.2f}x, "
              f"max {max(egress):.2f}x over {len(egress)} seeds")
    sys.exit(1 if any(r["failures"] for r in reports) else 0)


if __name__ == "__main__":
    main()
