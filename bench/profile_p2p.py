"""Profile one peer-to-peer stream: peer B pulls a blob cold from peer A on loopback (A took it
from a real docker-registry first). Prints B's throughput per pull; with --py-spy FILE, records
B's first pull with py-spy (raw format: `stack count` lines, one per distinct stack), and the
CPU (user + system ticks from /proc) that A, B and the scheduler spent on each pull.

    python bench/profile_p2p.py --size 256 --runs 3 --py-spy /tmp/b.txt
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import Cluster, Registry, pull_digest, push_blob

MiB = 1 << 20


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def run(size: int, runs: int, spy_out: str | None) -> list[float]:
    rates = []
    with tempfile.TemporaryDirectory(prefix="naiad-p2p-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        await registry.ready()
        digest = await push_blob(registry.url, "bench/p2p", os.urandom(size))
        (work / "cluster").mkdir()
        cluster = Cluster(work / "cluster")
        try:
            sched = await cluster.scheduler()
            a = await cluster.peer("a", sched.url, registry.url)
            path = f"/v2/bench/p2p/blobs/{digest}"
            assert await pull_digest(a.url + path) == digest
            for k in range(runs):
                b = await cluster.peer(f"b{k}", sched.url, registry.url)
                spy = None
                if spy_out and k == 0:
                    spy = await asyncio.create_subprocess_exec(
                        "py-spy", "record", "-o", spy_out, "-f", "raw", "-r", "200",
                        "-p", str(b.proc.popen.pid),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    await asyncio.sleep(1)  # py-spy attaches
                pids = {"a": a.proc.popen.pid, "b": b.proc.popen.pid,
                        "scheduler": sched.proc.popen.pid}
                before = {n: cpu_ticks(p) for n, p in pids.items()}
                started = time.monotonic()
                assert await pull_digest(b.url + path) == digest
                rates.append(size / MiB / (time.monotonic() - started))
                print(f"pull {k + 1}: CPU ticks " + ", ".join(
                    f"{n} {cpu_ticks(p) - before[n]}" for n, p in pids.items()))
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    await spy.wait()
        finally:
            cluster.stop()
            registry.stop()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="blob size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--py-spy", metavar="FILE", help="record the first pull with py-spy")
    args = parser.parse_args()
    rates = asyncio.run(run(args.size * MiB, args.runs, args.py_spy))
    print("B cold from A, MiB/s per pull:", ", ".join(f"{r:.0f}" for r in rates))


if __name__ == "__main__":
    main()
