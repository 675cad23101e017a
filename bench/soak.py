"""Soak: a real docker-registry, a scheduler and four peers on loopback for --minutes (30 by
default), with faults injected all along, every byte checked.

- Peers: `steady` (never restarted), `quota` (--disk-quota a third of the blobs, at least 1.5
  of the largest, so blobs are evicted and fetched again; never restarted), `churn-a` and
  `churn-b` (restarted by SIGTERM or SIGKILLed and restarted, in turn). The scheduler (in
  memory) is SIGTERMed and restarted on its port, in the first half of the run only, so its
  last run is long enough to measure.
- Clients: --workers loops, each pulling whole blobs (1 in 4) and nydusd-pattern range reads
  (128 KiB-1 MiB at unaligned offsets, as bench/micro.py) through a random peer that is up,
  checking every byte, each pausing --pause seconds between requests. Fresh connections each
  time, as after a restart a client would have.
- Samples every --sample-seconds the RSS and open fds (/proc/<pid>/status, /proc/<pid>/fd) of
  every daemon. Growth is measured over each daemon's last run: from --warmup-seconds after it
  started (the least sample of the next minute) to the end (the least of the last minute).
- Bounded: it stops by itself at the deadline or after --max-requests requests, each request
  bounded by REQUEST_SECONDS.

A failed request is "hit by a fault" when the peer it was sent to was being stopped or was
down at any moment of it (its drain, its death, its restart); every other failure counts, also
those during a scheduler restart or while a parent was killed: peers must ride those out.

Exits 1 on a wrong byte, a failure outside the injected faults, or growth above 10 %.

    XDG_CONFIG_HOME=$(mktemp -d) python bench/soak.py --minutes 30

Diagnosis: `--memory-report S` has the steady and quota peers log what their memory is made of
(common/memory.py) every S seconds, `--tracemalloc` adds Python's own allocations, `--peer-env
K=V` sets a variable for every peer (MALLOC_ARENA_MAX=2, say), `--keep DIR` keeps the daemons'
logs and the samples (samples.csv) there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loopback import cpu_seconds, rss_kib
from tests.cluster import (
    Cluster,
    CountingProxy,
    Node,
    Registry,
    push_blob,
    spawn,
    wait_http,
    wait_registered_peer,
)

MiB = 1 << 20
KiB = 1 << 10
REQUEST_SECONDS = 120.0
STALL_SECONDS = 30.0  # no byte for this long fails a request
STOP_SECONDS = 30.0  # a daemon that ignores SIGTERM this long is SIGKILLed
GROWTH_LIMIT = 0.10
# Samples compared at warm-up and at the end, by their floor over this long: what the daemon
# holds with the least in flight (a leak raises the floor; a burst of connections or buffers
# does not). A minute, as idle keep-alive connections close after 15 s: over 15 s the fd
# floor of the quota peer wandered 34-47 without a trend.
WINDOW_SECONDS = 60.0


@dataclass
class Daemon:
    name: str
    node: Node
    role: str  # scheduler | steady | quota | churn
    env: dict[str, str] = field(default_factory=dict)
    up: bool = True
    started: float = 0.0  # of its current run
    restarts: int = 0
    down: list[tuple[float, float, str]] = field(default_factory=list)  # (from, to, fault)

    @property
    def pid(self) -> int:
        return self.node.proc.popen.pid

    def down_during(self, start: float, end: float) -> str | None:
        """The fault that had this daemon stopping or down at some moment of [start, end]."""
        for since, until, fault in self.down:
            if since <= end and until >= start:
                return fault
        return None


@dataclass
class Request:
    kind: str  # pull | range
    peer: str
    started: float
    ended: float
    nbytes: int = 0
    wrong: int = 0
    error: str = ""


@dataclass
class Sample:
    at: float
    daemon: str
    run: int
    rss_kib: int
    fds: int
    cpu_s: float  # user + system, since the daemon's run started


@dataclass
class Soak:
    args: argparse.Namespace
    work: Path
    t0: float = field(default_factory=time.monotonic)
    blobs: list[tuple[str, bytes]] = field(default_factory=list)  # (path, bytes)
    daemons: dict[str, Daemon] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    stopping: bool = False
    quota: int = 0  # the quota peer's --disk-quota: below the blobs' total, so some are evicted

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- daemons ---------------------------------------------------------------------------

    async def start(self, registry_url: str) -> None:
        cluster = self.cluster = Cluster(self.work)
        sched = await cluster.scheduler()
        self.daemons["scheduler"] = Daemon("scheduler", sched, "scheduler")
        roles = {"steady": "steady", "quota": "quota", "churn-a": "churn", "churn-b": "churn"}
        envs = {name: self.env(role) for name, role in roles.items()}
        nodes = await asyncio.gather(*(
            cluster.peer(name, sched.url, registry_url,
                         *(("--disk-quota", str(self.quota)) if role == "quota" else ()),
                         env=envs[name])
            for name, role in roles.items()))
        for node, (name, role) in zip(nodes, roles.items(), strict=True):
            self.daemons[name] = Daemon(name, node, role, envs[name])

    def env(self, role: str) -> dict[str, str]:
        """A peer's environment: --peer-env, and the memory reports for the measured peers."""
        env = dict(kv.split("=", 1) for kv in self.args.peer_env)
        if self.args.memory_report and role in ("steady", "quota"):
            env["NAIAD_MEMORY_REPORT"] = "1"
            if self.args.tracemalloc:
                env["PYTHONTRACEMALLOC"] = "1"
        return env

    async def _stop(self, d: Daemon, sig: int) -> None:
        d.node.proc.popen.send_signal(sig)
        try:
            await asyncio.to_thread(d.node.proc.popen.wait, STOP_SECONDS)
        except subprocess.TimeoutExpired:
            d.node.proc.popen.kill()
            await asyncio.to_thread(d.node.proc.popen.wait)

    async def restart_peer(self, d: Daemon, sig: int, fault: str) -> None:
        d.up = False
        since = self.now()
        try:
            await self._stop(d, sig)
            d.node.proc = spawn(d.name, d.node.extra["argv"], self.work, d.env)
            await wait_http(f"{d.node.url}/healthy", 60, proc=d.node.proc)
            await wait_registered_peer(self.daemons["scheduler"].node.url, d.name, 60)
        finally:
            d.down.append((since, self.now(), fault))
        d.started, d.restarts, d.up = self.now(), d.restarts + 1, True

    async def restart_scheduler(self) -> None:
        d = self.daemons["scheduler"]
        d.up = False
        since = self.now()
        try:
            await self._stop(d, signal.SIGTERM)
            fresh = await self.cluster.scheduler(port=d.node.extra["port"])
            self.cluster.nodes.remove(fresh)  # one node per role, with the new process
            d.node.proc = fresh.proc
        finally:
            d.down.append((since, self.now(), "scheduler restart"))
        d.started, d.restarts, d.up = self.now(), d.restarts + 1, True

    async def inject(self, deadline: float) -> None:
        """A fault every --fault-seconds (jittered): SIGTERM-restart or SIGKILL-restart a
        churn peer, or (first half only) restart the scheduler, in turn."""
        rng = random.Random(self.args.seed)
        churn = [d for d in self.daemons.values() if d.role == "churn"]
        order = ["peer SIGTERM + restart", "scheduler SIGTERM + restart",
                 "peer SIGKILL + restart"]
        i = 0
        while True:
            await asyncio.sleep(self.args.fault_seconds * rng.uniform(0.7, 1.3))
            if self.now() >= deadline - self.args.fault_seconds / 2 or self.stopping:
                return
            fault = order[i % len(order)]
            i += 1
            if fault.startswith("scheduler"):
                if self.now() > deadline / 2:
                    fault = "peer SIGKILL + restart"
                else:
                    await self.restart_scheduler()
                    self.faults[fault] += 1
                    continue
            target = rng.choice(churn)
            sig = signal.SIGTERM if "SIGTERM" in fault else signal.SIGKILL
            await self.restart_peer(target, sig, fault)
            self.faults[fault] += 1

    # -- clients ---------------------------------------------------------------------------

    async def worker(self, n: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + n)
        timeout = aiohttp.ClientTimeout(total=REQUEST_SECONDS, sock_read=STALL_SECONDS)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            while self.now() < deadline and len(self.requests) < self.args.max_requests \
                    and not self.stopping:
                peers = [d for d in self.daemons.values() if d.role != "scheduler" and d.up]
                if not peers:
                    await asyncio.sleep(0.1)
                    continue
                peer = rng.choice(peers)
                path, blob = rng.choice(self.blobs)
                if rng.random() < 0.25:
                    start, length, kind = 0, len(blob), "pull"
                else:
                    length = rng.randint(128 * KiB, MiB)
                    start, kind = rng.randrange(0, len(blob) - length), "range"
                req = Request(kind, peer.name, self.now(), 0.0)
                try:
                    await self._get(s, peer.node.url + path, blob, start, length, kind, req)
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    req.error = req.error or f"{type(e).__name__}: {e}"
                req.ended = self.now()
                if not req.error and req.nbytes != length:
                    req.error = f"short: {req.nbytes} of {length} bytes"
                self.requests.append(req)
                await asyncio.sleep(self.args.pause)

    async def _get(self, s: aiohttp.ClientSession, url: str, blob: bytes, start: int,
                   length: int, kind: str, req: Request) -> None:
        headers = {}
        if kind == "range":  # as nydusd reads: a small on-demand range, urgent
            headers = {"Range": f"bytes={start}-{start + length - 1}",
                       "X-Dragonfly-Priority": "6"}
        async with s.get(url, headers=headers) as r:
            want = 206 if kind == "range" else 200
            if r.status != want:
                req.error = f"status {r.status}: {(await r.text())[:200]}"
                return
            async for chunk in r.content.iter_chunked(256 * KiB):
                at = start + req.nbytes
                expected = blob[at:at + len(chunk)]
                if chunk != expected:
                    req.wrong += sum(a != b for a, b in zip(chunk, expected, strict=False)) \
                        + abs(len(chunk) - len(expected))
                req.nbytes += len(chunk)

    # -- sampling --------------------------------------------------------------------------

    async def sample(self, deadline: float) -> None:
        while self.now() < deadline and not self.stopping:
            for d in self.daemons.values():
                if not d.up:
                    continue
                try:
                    rss = rss_kib(d.pid)
                    fds = len(os.listdir(f"/proc/{d.pid}/fd"))
                    cpu = cpu_seconds(d.pid)
                except (FileNotFoundError, ProcessLookupError):
                    continue
                self.samples.append(Sample(self.now(), d.name, d.restarts, rss, fds, cpu))
            await asyncio.sleep(self.args.sample_seconds)

    async def memory_reports(self, deadline: float) -> None:
        """SIGUSR1 to the peers that log memory reports, every --memory-report seconds from
        the warm-up on (the first report is the one the others are compared with)."""
        await asyncio.sleep(self.args.warmup_seconds)
        while self.now() < deadline and not self.stopping:
            for d in self.daemons.values():
                if d.up and "NAIAD_MEMORY_REPORT" in d.env:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(d.pid, signal.SIGUSR1)
            await asyncio.sleep(self.args.memory_report)

    def keep(self, to: Path) -> None:
        """The daemons' logs and every sample, for a look after the run."""
        to.mkdir(parents=True, exist_ok=True)
        for d in self.daemons.values():
            with contextlib.suppress(FileNotFoundError):
                shutil.copy(d.node.proc.log_path, to / d.node.proc.log_path.name)
        with open(to / "samples.csv", "w") as f:
            f.write("at,daemon,run,rss_kib,fds,cpu_s\n")
            f.writelines(f"{s.at:.1f},{s.daemon},{s.run},{s.rss_kib},{s.fds},{s.cpu_s:.2f}\n"
                         for s in self.samples)


async def run(args: argparse.Namespace) -> tuple[Soak, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="naiad-soak-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        await registry.ready()
        front = CountingProxy(registry.port)  # counts what the registry sends
        await front.start()
        soak = Soak(args, work)
        try:
            rng = random.Random(args.seed)
            for _ in range(args.blobs):
                blob = rng.randbytes(rng.randint(2, args.max_blob_mib) * MiB
                                     + rng.randrange(MiB))  # odd last pieces too
                digest = await push_blob(registry.url, "soak/blobs", blob)
                soak.blobs.append((f"/v2/soak/blobs/blobs/{digest}", blob))
            sizes = [len(b) for _, b in soak.blobs]
            soak.quota = max(sum(sizes) // 3, max(sizes) * 3 // 2) // MiB * MiB
            await soak.start(front.url)
            soak.t0 = time.monotonic()
            for d in soak.daemons.values():
                d.started = 0.0
            deadline = args.minutes * 60
            tasks = [asyncio.create_task(soak.worker(n, deadline)) for n in range(args.workers)]
            tasks += [asyncio.create_task(soak.inject(deadline)),
                      asyncio.create_task(soak.sample(deadline))]
            if args.memory_report:
                tasks.append(asyncio.create_task(soak.memory_reports(deadline)))
            try:
                await asyncio.gather(*tasks)  # each ends by itself at the deadline
            finally:
                soak.stopping = True  # a fault that could not be injected stops everything
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
            logs = {n: d.node.proc.log_path.read_text(errors="replace")  # whole: all counted
                    for n, d in soak.daemons.items()}
            if args.keep:
                soak.keep(Path(args.keep))
            totals = {"origin_bytes": front.bytes_down,
                      "evictions": logs["quota"].count("evicted sha256:"),
                      "tracebacks": sum(log.count("Traceback") for log in logs.values())}
        finally:
            with contextlib.suppress(Exception):
                soak.cluster.stop()
            await front.stop()
            registry.stop()
    return soak, totals


# -- report ------------------------------------------------------------------------------

def growth(soak: Soak, name: str) -> tuple[str, str, bool]:
    """RSS and fds of a daemon's last run, warm-up vs end; whether within the limit (or
    unmeasured: the run was too short)."""
    d = soak.daemons[name]
    mine = [s for s in soak.samples if s.daemon == name and s.run == d.restarts]
    warm = [s for s in mine if s.at >= d.started + soak.args.warmup_seconds]
    if not warm or warm[-1].at - warm[0].at < 2 * WINDOW_SECONDS:
        return ("n/a (last run too short)",) * 2 + (True,)  # type: ignore[return-value]
    base = [s for s in warm if s.at < warm[0].at + WINDOW_SECONDS]
    end = [s for s in warm if s.at > warm[-1].at - WINDOW_SECONDS]
    out, ok = [], True
    for get, unit in ((lambda s: s.rss_kib / 1024, "MiB"), (lambda s: s.fds, "")):
        b, e = min(get(s) for s in base), min(get(s) for s in end)
        g = (e - b) / b if b else 0.0
        ok &= g <= GROWTH_LIMIT
        out.append(f"{b:.1f}{unit} → {e:.1f}{unit} ({g:+.1%}, peak "
                   f"{max(get(s) for s in mine):.1f}{unit})")
    return out[0], out[1], ok


def report(soak: Soak, totals: dict[str, float], command: str) -> bool:
    reqs = soak.requests
    excused = [(r, soak.daemons[r.peer].down_during(r.started, r.ended)) for r in reqs
               if r.error]
    hit = Counter(f for _, f in excused if f)
    outside = [r for r, f in excused if not f]
    wrong = sum(r.wrong for r in reqs)
    pulls = [r for r in reqs if r.kind == "pull" and not r.error]
    ranges = [r for r in reqs if r.kind == "range" and not r.error]
    worst = max(reqs, key=lambda r: r.ended - r.started, default=None)
    lat = sorted(r.ended - r.started for r in ranges)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=Path(__file__).parent).stdout.strip() or "?"
    print(f"# `{command}`\n\n{time.strftime('%Y-%m-%d %H:%M')}, machine `{platform.node()}` "
          f"({os.cpu_count()} cores, {platform.system()} {platform.release()}), naiad `{rev}`; "
          f"{soak.args.blobs} blobs of 2-{soak.args.max_blob_mib} MiB, {soak.args.workers} "
          f"clients pausing {soak.args.pause} s between requests, quota peer "
          f"{soak.quota // MiB} MiB\n")
    print("| measure | value |\n|---|---|")
    served = sum(r.nbytes for r in reqs)
    rows = [
        ("run", f"{soak.now() / 60:.1f} min, {len(reqs)} requests"),
        ("whole-blob pulls done (exact)",
         f"{len(pulls)} ({sum(r.nbytes for r in pulls) / 2**30:.2f} GiB)"),
        ("range reads done (exact)", f"{len(ranges)}; latency p50 {pct(0.5):.1f} ms, "
                                     f"p99 {pct(0.99):.1f} ms"),
        ("wrong bytes", f"**{wrong}**"),
        ("failed requests outside the injected faults", f"**{len(outside)}**"),
        ("failed requests to a peer being stopped or down",
         ", ".join(f"{f}: {n}" for f, n in sorted(hit.items())) or "0"),
        ("faults injected", ", ".join(f"{f}: {n}" for f, n in sorted(soak.faults.items()))
         or "none"),
        ("worst stall (longest request)",
         f"{worst.ended - worst.started:.2f} s ({worst.kind} via {worst.peer} at "
         f"{worst.started:.0f} s{', ' + worst.error[:80] if worst.error else ''})"
         if worst else "-"),
        ("registry egress", f"{totals['origin_bytes'] / MiB:.0f} MiB for {served / MiB:.0f} "
                            f"MiB served to clients"),
        ("quota peer evictions", f"{totals['evictions']:.0f}"),
        ("tracebacks in the daemons' logs", f"{totals['tracebacks']:.0f}"),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    print("\n| daemon | restarts | RSS warm-up → end (last run) | open fds warm-up → end "
          "| CPU (last run) |\n|---|---|---|---|---|")
    grown = False
    for name, d in soak.daemons.items():
        rss, fds, ok = growth(soak, name)
        grown |= not ok
        cpu = max((s.cpu_s for s in soak.samples if s.daemon == name and s.run == d.restarts),
                  default=0.0)
        print(f"| {name} ({d.role}) | {d.restarts} | {rss} | {fds} | {cpu:.0f} s |")
    for r in outside[:10]:
        print(f"failed outside faults: {r.kind} via {r.peer} at {r.started:.1f}-"
              f"{r.ended:.1f} s: {r.error[:300]}", file=sys.stderr)
    return wrong == 0 and not outside and not grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=4, help="concurrent clients")
    parser.add_argument("--blobs", type=int, default=8)
    parser.add_argument("--max-blob-mib", type=int, default=24)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds each client waits between requests")
    parser.add_argument("--fault-seconds", type=float, default=None,
                        help="between faults (default: 30, or an eighth of a short run)")
    parser.add_argument("--sample-seconds", type=float, default=3.0)
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help="after a daemon starts (default: a tenth of the run, 15-180 s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--memory-report", type=float, default=0.0, metavar="SECONDS",
                        help="the steady and quota peers log a memory report this often")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="with --memory-report: trace Python's allocations too")
    parser.add_argument("--peer-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every peer (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="keep logs and samples.csv here")
    args = parser.parse_args()
    seconds = args.minutes * 60
    if args.fault_seconds is None:
        args.fault_seconds = min(30.0, seconds / 8)
    if args.warmup_seconds is None:
        args.warmup_seconds = min(180.0, max(15.0, seconds / 10))
    command = "python bench/soak.py " + shlex.join(sys.argv[1:])
    soak, totals = asyncio.run(run(args))
    sys.exit(0 if report(soak, totals, command.strip()) else 1)


if __name__ == "__main__":
    main()
