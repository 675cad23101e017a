"""An in-process sampling profiler, for where py-spy cannot attach (on the project's VMs it
fails with "Failed to find python version"): SIGPROF every 1/rate s of the process's CPU time,
each interrupted stack folded in py-spy's raw format (`frame;frame;… count`), which flamegraph
tools and `--top` read.

    python -m bench.sampler [--rate 200] OUT -m bench.fleet --store memory …
    python -m bench.sampler OUT script.py args…
    python -m bench.sampler --top 25 OUT          # self and inclusive shares by function

A process another one starts (the scheduler bench.fleet spawns) samples itself when
`NAIAD_SAMPLE=OUT` is set and bench/sampler_site is first on its PYTHONPATH (its
sitecustomize calls `install_from_env`); it writes OUT.PID at exit and every 2 s of wall, so a
process that is killed still leaves its profile. `NAIAD_SAMPLE_MATCH` (default `naiad`) picks
the processes by a word of their command line.

Only the main thread is sampled (signals run there): the asyncio loop, where the daemons' work is.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType


class Sampler:
    """Folded stacks of the main thread, counted at each SIGPROF."""

    def __init__(self, rate: float = 200.0) -> None:
        self.rate = rate
        self.counts: collections.Counter[str] = collections.Counter()

    def _on_signal(self, _sig: int, frame: FrameType | None) -> None:
        stack = []
        while frame is not None:
            code = frame.f_code
            where = os.path.join(os.path.basename(os.path.dirname(code.co_filename)),
                                 os.path.basename(code.co_filename))
            stack.append(f"{code.co_qualname} ({where}:{frame.f_lineno})")
            frame = frame.f_back
        self.counts[";".join(reversed(stack))] += 1

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._on_signal)
        signal.setitimer(signal.ITIMER_PROF, 1 / self.rate, 1 / self.rate)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0)

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            for stack, n in list(self.counts.items()):
                f.write(f"{stack} {n}\n")
        os.replace(tmp, path)


def install_from_env() -> None:
    """Sample this process if NAIAD_SAMPLE names an output and its command line matches."""
    out = os.environ.get("NAIAD_SAMPLE")
    if not out:
        return
    try:
        with open("/proc/self/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return
    if os.environ.get("NAIAD_SAMPLE_MATCH", "naiad").encode() not in words:
        return
    sampler = Sampler(float(os.environ.get("NAIAD_SAMPLE_RATE", "200")))
    path = f"{out}.{os.getpid()}"

    def keep_writing() -> None:
        while True:
            time.sleep(2)
            sampler.write(path)

    sampler.start()
    atexit.register(lambda: (sampler.stop(), sampler.write(path)))  # a SIGPROF at exit kills
    threading.Thread(target=keep_writing, name="naiad-sampler", daemon=True).start()


def function_of(frame: str) -> str:
    """`qualname (dir/file.py:line)` without the line: one entry per function."""
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})"


def top(lines: Iterable[str], n: int) -> list[tuple[str, float, float]]:
    """The `n` functions with the most self time: (function, self share, inclusive share)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = [function_of(f) for f in stack.split(";")]
        own[frames[-1]] += k
        for f in set(frames):
            inclusive[f] += k
    if not total:
        return []
    return [(f, k / total, inclusive[f] / total) for f, k in own.most_common(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folded stacks written (or read, with --top)")
    p.add_argument("--rate", type=float, default=200.0, help="samples per CPU second")
    p.add_argument("--top", type=int, metavar="N", help="print the N functions with most self "
                   "time in OUT and exit")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-m module args… or script.py args…")
    args = p.parse_args(argv)
    if args.top:
        with open(args.out) as f:
            for name, own, inclusive in top(f, args.top):
                print(f"{own:6.1%} self {inclusive:6.1%} incl  {name}")
        return 0
    if not args.command:
        p.error("a command to run: -m module args… or script.py args…")
    sampler = Sampler(args.rate)
    sampler.start()
    try:
        if args.command[0] == "-m" and len(args.command) > 1:
            sys.argv = args.command[1:]
            runpy.run_module(args.command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = args.command
            runpy.run_path(args.command[0], run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    finally:
        sampler.stop()
        sampler.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
