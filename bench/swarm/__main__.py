"""The swarm lab (issue 7): naiad against direct pulls and BitTorrent on shaped links between
network namespaces on this machine, in the same run. See bench/swarm/README.md.

As root, from the repository root:

    python -m bench.swarm --peers 8 --size 64 --runs 3
    python -m bench.swarm --peers 8 --size 64 --runs 3 --fault parent-cut
    python -m bench.swarm --cleanup      # remove what a crashed run left behind
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from bench.swarm import bittorrent, direct, faults, naiad_swarm
from bench.swarm.clients import Trial
from bench.swarm.registry import MiB, Registry, make_blob
from bench.swarm.report import SYSTEMS, Result, fluid_bound, run_line, table
from bench.swarm.topology import CpuSampler, Lab, destroy_leftovers, leftover_namespaces

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = Path("/dev/shm/naiad-swarm" if os.path.isdir("/dev/shm")
                       else "/var/tmp/naiad-swarm")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.swarm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--peers", type=int, default=8, help="peer hosts (default 8)")
    ap.add_argument("--size", type=int, default=64, help="blob size, MiB (default 64)")
    ap.add_argument("--origin-rate", type=float, default=160.0,
                    help="origin egress, Mbit/s (default 160)")
    ap.add_argument("--peer-rate", type=float, default=320.0,
                    help="each peer's egress, Mbit/s (default 320)")
    ap.add_argument("--runs", type=int, default=1, help="repetitions; medians are reported")
    ap.add_argument("--systems", default=None,
                    help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds a pull may take before it counts as failed (default 900)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"scratch (blobs, stores, copies) and logs (default {DEFAULT_WORKDIR}; "
                         "tmpfs, so the hosts do not contend for one virtual disk)")
    ap.add_argument("--naiad-rev", default=None, metavar="REV",
                    help="run naiad as committed at this git revision (`git archive` into "
                         "scratch; the working tree is not touched) instead of the installed "
                         "working tree")
    ap.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every naiad peer (repeatable, e.g. "
                         "--peer-arg=--upload-slots=16)")
    ap.add_argument("--scheduler-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the naiad scheduler (repeatable)")
    ap.add_argument("--trace", action="store_true",
                    help="sample naiad's piece map every 0.5 s during its pull (timeline.json)")
    ap.add_argument("--py-spy", action="store_true",
                    help="profile every naiad process during its pull (py-spy-*.txt, "
                         "collapsed stacks; the profiler costs CPU: not for timed figures)")
    ap.add_argument("--bt-utp", action="store_true",
                    help="BitTorrent over uTP too (default: TCP only)")
    ap.add_argument("--bt-hybrid", action="store_true",
                    help="a hybrid v1+v2 torrent, libtorrent's default (default: v1 only)")
    ap.add_argument("--quiet-below", type=float, default=0.25, metavar="FRACTION",
                    help="before each trial, wait for a second with the machine's CPU busy "
                         "below this (default 0.25)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, metavar="SECONDS",
                    help="longest wait for that quiet second (default 120)")
    ap.add_argument("--fault", choices=faults.FAULTS, default=None,
                    help="inject this network fault during every pull (bench/swarm/faults.py; "
                         "naiad and direct only; --systems defaults to naiad)")
    ap.add_argument("--cleanup", action="store_true",
                    help="remove namespaces (and their processes) left by a crashed run; exit")
    args = ap.parse_args(argv)
    if args.systems is None:
        args.systems = "naiad" if args.fault else ",".join(SYSTEMS)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.fault and "bittorrent" in args.systems:
        ap.error("--fault applies to naiad and direct only")
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    return args


def _version(*argv: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def naiad_source(rev: str | None, scratch: Path) -> tuple[Path | None, str]:
    """Where naiad runs from, and which version that is."""
    if rev is None:
        described = _version("git", "-C", str(REPO), "describe", "--always", "--dirty")
        return None, f"working tree {described}"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True, capture_output=True, text=True).stdout.strip()
    src = scratch / f"naiad-{commit[:10]}"
    src.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
    if archive.wait():
        raise RuntimeError(f"git archive {commit} failed")
    return src, f"commit {commit[:10]}"


def describe(args: argparse.Namespace, naiad: str) -> dict[str, object]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python -m bench.swarm " + " ".join(sys.argv[1:]),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, kernel {platform.release()}",
        "python": platform.python_version(),
        "naiad": naiad,
        "registry": _version("docker-registry", "--version"),
        "libtorrent": _version("/usr/bin/python3", "-c",
                               "import libtorrent; print(libtorrent.__version__)"),
        "peers": args.peers, "size_mib": args.size, "fault": args.fault,
        "origin_mbit": args.origin_rate, "peer_mbit": args.peer_rate,
    }


async def _quiet(below: float, patience: float) -> float:
    """Wait (at most `patience` seconds) for a second in which the machine's CPU is busy less
    than `below` (other work on a 2-core machine skews every figure); the last sample."""
    deadline = time.monotonic() + patience
    while True:
        cpu = CpuSampler()
        cpu.start()
        await asyncio.sleep(1.0)
        busy = float(cpu.stop()["busy"])
        if busy < below or time.monotonic() > deadline:
            return busy


def _origin_gets(lab: Lab, gets: list[tuple[str, int]]) -> dict[str, list[int]]:
    """The registry's blob GETs during a trial: per host, the MiB each request carried."""
    names = {h.ip: h.name for h in lab.hosts}
    out: dict[str, list[int]] = {}
    for client, sent in gets:
        out.setdefault(names.get(client, client), []).append(round(sent / MiB))
    return out


async def experiment(lab: Lab, args: argparse.Namespace, naiad_src: Path | None,
                     scratch: Path, logs: Path, results: list[Result]) -> None:
    """Run every trial, appending to `results` as each ends (so an interrupted run keeps what it
    measured)."""
    size = args.size * MiB
    bound = fluid_bound(size, args.peers, args.origin_rate * 1e6, args.peer_rate * 1e6)
    opts = naiad_swarm.NaiadOptions(src=naiad_src, peer_args=args.peer_arg,
                                    scheduler_args=args.scheduler_arg, trace=args.trace,
                                    py_spy=args.py_spy)
    systems: dict[str, Callable[[Trial], Awaitable[Result]]] = {
        "naiad": partial(naiad_swarm.run, opts=opts),
        "bittorrent": partial(bittorrent.run, opts=bittorrent.BtOptions(
            utp=args.bt_utp, hybrid=args.bt_hybrid)),
        "direct": direct.run,
    }
    registry = Registry(lab, scratch / "registry", logs / "registry.log")
    await registry.start()
    print(f"fluid bound {bound:.2f} s for {args.peers} x {args.size} MiB, origin "
          f"{args.origin_rate:g} Mbit/s, peers {args.peer_rate:g} Mbit/s; logs in {logs}",
          flush=True)
    try:
        for r in range(args.runs):
            path = scratch / f"blob-{r}"
            digest, _ = await asyncio.to_thread(make_blob, path, size)
            blob = await registry.push(path, digest, size, f"swarm/run{r}")
            for name in [s for s in systems if s in args.systems]:
                trial = Trial(lab=lab, blob=blob, registry_url=registry.url,
                              workdir=scratch / f"{name}-{r}", logdir=logs / f"run{r}",
                              run=r, timeout=args.timeout, fault=args.fault)
                trial.workdir.mkdir(parents=True)
                background = await _quiet(args.quiet_below, args.quiet_wait)
                logged = registry.log_size()
                try:
                    result = await systems[name](trial)
                except Exception as e:  # one failed trial must not lose the others
                    result = Result(system=name, run=r, seconds=None, origin_tx=0, size=size,
                                    sha_ok=False, error=repr(e))
                finally:
                    shutil.rmtree(trial.workdir, ignore_errors=True)
                result.notes["cpu_busy_before"] = background
                result.notes["origin_gets"] = _origin_gets(lab, registry.gets_since(logged))
                results.append(result)
                print(run_line(result, bound), flush=True)
                (logs / "results.json").write_text(json.dumps(
                    {"bound": bound, "results": [x.to_json() for x in results]}, indent=1))
            path.unlink()
    finally:
        await registry.stop()


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    pass


async def run_lab(lab: Lab, args: argparse.Namespace, naiad_src: Path | None, scratch: Path,
                  logs: Path, results: list[Result]) -> None:
    """The experiment, cancelled by a signal; then every process the lab started is stopped
    and reaped while the event loop still runs."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    caught: list[int] = []

    def on_signal(sig: int) -> None:
        if not caught:
            caught.append(sig)
            me.cancel()

    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await experiment(lab, args, naiad_src, scratch, logs, results)
    except asyncio.CancelledError:
        if not caught:
            raise
        me.uncancel()
    finally:
        await lab.reap()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
    if caught:
        raise Interrupted(f"signal {caught[0]}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    if args.cleanup:
        removed = destroy_leftovers()
        shutil.rmtree(args.workdir / "scratch", ignore_errors=True)
        print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
        return 0
    if leftover_namespaces():
        print("namespaces from an earlier run are still there: "
              "python -m bench.swarm --cleanup", file=sys.stderr)
        return 2
    for tool in ("ip", "tc", "curl", "docker-registry", bittorrent.PYTHON):
        if shutil.which(tool) is None:
            print(f"{tool} is needed", file=sys.stderr)
            return 2

    scratch = args.workdir / "scratch"
    logs = args.workdir / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True)
    lab = Lab(args.peers, int(args.origin_rate * 1e6), int(args.peer_rate * 1e6), REPO)

    def terminate(signum: int, _frame: object) -> None:  # outside the event loop
        raise Interrupted(f"signal {signum}")

    for sig in SIGNALS:  # SIGINT too: a shell starts background jobs with it ignored
        signal.signal(sig, terminate)

    results: list[Result] = []
    meta: dict[str, object] = {}
    code = 0
    try:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        naiad_src, version = naiad_source(args.naiad_rev, scratch)
        meta = describe(args, version)
        (logs / "meta.json").write_text(json.dumps(meta, indent=1))
        lab.create()
        if args.fault:
            faults.prepare(lab, args.fault)
        asyncio.run(run_lab(lab, args, naiad_src, scratch, logs, results))
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"\ninterrupted ({e}): cleaned up", file=sys.stderr)
        code = 130
    finally:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # cleanup must not be cut short
        lab.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    if results:
        bound = fluid_bound(args.size * MiB, args.peers, args.origin_rate * 1e6,
                            args.peer_rate * 1e6)
        print()
        print(f"{meta['date']}: {meta['command']}")
        print(f"{meta['machine']}; naiad {meta['naiad']}; {meta['registry']}; "
              f"libtorrent {meta['libtorrent']}")
        print(table(results, bound))
        print(f"\nper-run details: {logs / 'results.json'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
