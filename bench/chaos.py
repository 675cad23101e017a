"""The chaos suite's scenario (tests/test_chaos.py) over many seeds and bigger blobs: N peers
pull one blob at once while some are SIGKILLed part-way through their pulls (at a byte count
drawn from the seed), a fake peer serves corrupt chunks under true ids, and the scheduler is
SIGKILLed and restarted on its port.

Per seed it reports whether every surviving client got the exact blob (checked byte by byte as
it arrived), how many corrupt chunks the fake sent in full to surviving peers and how many they
caught, and the registry's egress as a multiple of the blob (a TCP front before the registry
counts it). Exits 1 if any survivor failed, saw a wrong byte or let a corrupt chunk through.

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
                              "origin_multiple": float("nan"), "corrupt_served": {},
                              "corrupt_caught": {}}
                finally:
                    cluster.stop()
                report["seconds"] = time.monotonic() - started
                reports.append(report)
                served, caught = _corrupt(report)
                print(f"seed {seed}: failures {report['failures'] or 'none'}, registry "
                      f"{report['origin_multiple']:.2f}x, corrupt chunks served to survivors "
                      f"{served}, caught {caught}, {report['seconds']:.1f} s", file=sys.stderr)
        finally:
            await front.stop()
            registry.stop()
    return reports


def _corrupt(report: dict) -> tuple[int, int]:
    """Corrupt chunks the fake sent in full to surviving peers, and how many they caught."""
    return sum(report["corrupt_served"].values()), sum(report["corrupt_caught"].values())


def _failed(report: dict) -> bool:
    """A survivor without the exact blob, or a corrupt chunk a survivor did not catch."""
    return bool(report["failures"]) or report["corrupt_served"] != report["corrupt_caught"]


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
    print("| seed | survivors exact | corrupt chunks sent to survivors / caught | "
          "registry egress |")
    print("|---|---|---|---|")
    for r in reports:
        exact = "all" if not r["failures"] else f"FAILED: {r['failures']}"
        served, caught = _corrupt(r)
        print(f"| {r['seed']} | {exact} | {served} / {caught} | {r['origin_multiple']:.2f}x |")
    egress = [r["origin_multiple"] for r in reports if not r["failures"]]
    if egress:
        print(f"\nregistry egress: median {statistics.median(egress):.2f}x, "
              f"max {max(egress):.2f}x over {len(egress)} seeds")
    sys.exit(1 if any(_failed(r) for r in reports) else 0)


if __name__ == "__main__":
    main()
