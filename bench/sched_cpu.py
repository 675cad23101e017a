"""The scheduler's own CPU per HTTP call: `bench/scheduler.py --http`'s memory-store phases
(its workload, its scheduler process, its signed clients), with the scheduler process's user +
system CPU read from /proc around each phase. On a 2-core machine the load generator takes
about a core itself, so calls/s say as much about the client as about the scheduler; µs of
scheduler CPU per call is the figure that is the replica's own.

    python bench/sched_cpu.py --runs 3 --calls 10000 --tasks 200
    python bench/sched_cpu.py --runs 1 --py-spy /tmp/sched.txt    # a raw profile as well
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scheduler as sb
from tests.cluster import free_port

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_spy(pid: int, out: str) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([spy, "record", "-r", "250", "-f", "raw", "-p", str(pid), "-o", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def one_run(seed: int, args: argparse.Namespace, workdir: Path
                  ) -> dict[str, tuple[float, float]]:
    """Per phase: (items/s, scheduler CPU µs per call)."""
    w = sb.Workload(args.peers, args.tasks, args.pieces, args.calls, seed=seed)
    sb.quiet_gc()
    secret = None if args.unsigned else secrets.token_hex(16).encode()
    port = free_port()
    proc = sb.spawn_scheduler(port, None, workdir, secret)
    spy = start_spy(proc.pid, args.py_spy) if args.py_spy else None
    if spy is not None:
        await asyncio.sleep(1.0)  # attached before the calls start
    cpu: dict[str, float] = {}
    drive = sb.drive

    async def timed(calls, items, concurrency):  # type: ignore[no-untyped-def]
        before = cpu_seconds(proc.pid)
        phase = await drive(calls, items, concurrency)
        cpu[f"#{len(cpu)}"] = cpu_seconds(proc.pid) - before
        return phase

    sb.drive = timed
    try:
        phases = await sb.http_run(f"http://127.0.0.1:{port}", w, args.concurrency, secret)
    finally:
        sb.drive = drive
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        proc.send_signal(signal.SIGINT)
        proc.wait()
    return {name: (p.items_per_s, s / p.calls * 1e6)
            for (name, p), s in zip(phases.items(), cpu.values(), strict=True)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--pieces", type=int, default=1_000)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--unsigned", action="store_true")
    ap.add_argument("--py-spy", default=None, metavar="OUT",
                    help="record the scheduler with py-spy (raw folded stacks) into OUT")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="naiad-cpu-") as tmp:
        for r in range(args.runs):
            runs.append(await one_run(r, args, Path(tmp)))
            print(f"  run {r + 1}: " + ", ".join(f"{n} {v[0]:,.0f}/s {v[1]:.0f}us"
                                                 for n, v in runs[-1].items()), flush=True)
    print(f"\n| phase | items/s (median of {args.runs}) | scheduler CPU µs per call |")
    print("|---|---|---|")
    for name in runs[0]:
        print(f"| {name} | {statistics.median(r[name][0] for r in runs):,.0f} | "
              f"{statistics.median(r[name][1] for r in runs):.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
