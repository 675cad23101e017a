"""Scheduler state-store benchmark: a simulated cluster of 10,000 peers and 1,000,000 chunks
(1,000 tasks x 1,000 pieces), calls made directly on the Store objects, in memory and in Redis.

Phases, each timed on its own (calls/s, items/s, p50/p99 latency per call):

* register   every peer registers;
* announce   every chunk is announced once, in calls of 16 consecutive pieces (a lease run,
             what a peer's coalesced announcements look like), by a peer of the task's swarm;
* announce1  single-piece calls (a second holder for random pieces);
* heartbeat  one heartbeat per peer;
* schedule1  single-piece schedule calls: 90% on announced tasks (answers: parents), 10% on
             tasks nobody holds (answers: an origin lease, or wait for it);
* schedule8  the same with 8 consecutive pieces per call (a peer's read-ahead refill).

"Announcements" are piece claims and "decisions" per-piece answers. A memory run is one
coroutine calling in sequence (its latency is the call's own cost); a Redis run keeps
--concurrency calls in flight, as a replica serving many peers would. Each figure is the median
over --runs fresh clusters. With --http, register, announce, announce1, schedule1 and schedule8
are also measured through one `naiad scheduler` process and its HTTP API, with --concurrency
clients (signed as peers sign, unless --unsigned); with --framed as well, over the peers'
framed connections, one per client.

    python bench/scheduler.py --runs 3                  # both stores, full size
    python bench/scheduler.py --store memory --runs 1 --tasks 100 --peers 1000   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis
import redis.asyncio as aioredis

from bench.loopback import cpu_seconds
from common import auth
from common.models import (
    Announce,
    Heartbeat,
    PeerCounters,
    PeerLoad,
    PeerRegistration,
    PieceClaim,
    ScheduleRequest,
    TaskRequest,
)
from common.pieces import MiB
from peer.sched_framed import FramedTransport
from peer.sched_transport import HttpTransport
from scheduler.redis_store import RedisStore
from scheduler.store import MemoryStore, Store
from tests.cluster import free_port

RUN = 16  # pieces per announce call
SWARM = 30  # peers per task that announce its pieces
COLD = 0.1  # share of schedule calls on tasks nobody holds


def task_id(n: int) -> str:
    return f"sha256:{n:064x}"


def chunk_id(t: int, i: int) -> str:
    return f"blake3:{t:032x}{i:032x}"


@dataclass
class Phase:
    calls: int
    items: int
    seconds: float
    latencies: list[float]
    cpu: float = 0.0  # the scheduler process's CPU seconds (HTTP runs; 0: not measured)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000


async def drive(calls: list[Callable[[], Awaitable[Any]]], items: int,
                concurrency: int) -> Phase:
    """Run the calls with `concurrency` in flight; time each."""
    latencies: list[float] = []
    it = iter(calls)

    async def worker() -> None:
        for call in it:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Phase(len(calls), items, time.perf_counter() - started, latencies)


def quiet_gc() -> None:
    """The workload's million prebuilt requests are the bench's, not the store's: keep them out
    of the garbage collector's full passes, which would otherwise be timed as the store's."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Workload:
    """The requests of one run, built before any timing."""

    def __init__(self, peers: int, tasks: int, pieces: int, calls: int, seed: int) -> None:
        rng = random.Random(seed)
        self.peer_ids = [f"peer-{n:05d}" for n in range(peers)]
        self.regs = [PeerRegistration(id=pid, upload_addr=f"10.{n >> 16}.{(n >> 8) & 255}."
                                      f"{n & 255}:65002", idc=f"idc{n % 4}",
                                      location=f"r{n % 2}|z{n % 8}", upload_slots=8)
                     for n, pid in enumerate(self.peer_ids)]
        self.tasks = [TaskRequest(task_id=task_id(t), length=pieces * MiB, piece_size=MiB)
                      for t in range(tasks + max(1, tasks // 10))]  # the last tenth stay cold
        swarms = [rng.sample(self.peer_ids, SWARM) for _ in range(tasks)]
        self.announce = [
            Announce(peer_id=rng.choice(swarms[t]), task_id=task_id(t),
                     pieces=[PieceClaim(index=i, chunk=chunk_id(t, i))
                             for i in range(first, min(pieces, first + RUN))])
            for t in range(tasks) for first in range(0, pieces, RUN)]
        rng.shuffle(self.announce)
        self.announce1 = []
        for _ in range(calls):
            t, i = rng.randrange(tasks), rng.randrange(pieces)
            self.announce1.append(Announce(peer_id=rng.choice(swarms[t]), task_id=task_id(t),
                                           pieces=[PieceClaim(index=i, chunk=chunk_id(t, i))]))
        self.heartbeats = [(pid, Heartbeat(load=PeerLoad(active_uploads=rng.randrange(4)),
                                           counters=PeerCounters(started_at=1.0, origin=n,
                                                                 served=2 * n)))
                           for n, pid in enumerate(self.peer_ids)]

        def schedules(batch: int) -> list[ScheduleRequest]:
            out = []
            for _ in range(calls):
                cold = rng.random() < COLD
                t = rng.randrange(tasks, len(self.tasks)) if cold else rng.randrange(tasks)
                first = rng.randrange(pieces - batch + 1)
                out.append(ScheduleRequest(peer_id=rng.choice(self.peer_ids),
                                           task_id=task_id(t),
                                           pieces=list(range(first, first + batch))))
            return out
        self.schedule1 = schedules(1)
        self.schedule8 = schedules(8)


async def run_store(store: Store, w: Workload, concurrency: int) -> dict[str, Phase]:
    out: dict[str, Phase] = {}
    out["register"] = await drive([lambda r=r: store.register(r) for r in w.regs],
                                  len(w.regs), concurrency)
    for t in w.tasks:
        await store.ensure_task(t)
    out["announce"] = await drive([lambda a=a: store.announce(a) for a in w.announce],
                                  sum(len(a.pieces) for a in w.announce), concurrency)
    out["announce1"] = await drive([lambda a=a: store.announce(a) for a in w.announce1],
                                   len(w.announce1), concurrency)
    out["heartbeat"] = await drive([lambda p=p, hb=hb: store.heartbeat(p, hb)
                                    for p, hb in w.heartbeats], len(w.heartbeats), concurrency)
    for name, reqs in (("schedule1", w.schedule1), ("schedule8", w.schedule8)):
        out[name] = await drive([lambda r=r: store.schedule(r) for r in reqs],
                                sum(len(r.pieces) for r in reqs), concurrency)
    return out


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        until_ping(self.port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.log.close()


def until_ping(port: int, proc: subprocess.Popen | None = None) -> None:
    """Until the redis-server on `port` answers PING (10 s at most; at once if it exited)."""
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise
            time.sleep(0.02)
    client.close()


async def flush(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()


async def http_run(url: str, w: Workload, concurrency: int,
                   secret: bytes | None, framed: bool = False,
                   cpu: Callable[[], float] | None = None) -> dict[str, Phase]:
    """The same calls through the HTTP API of a `naiad scheduler --redis` process (or not),
    each signed with the cluster secret as a peer signs it (none: an --insecure scheduler).
    `framed`: over the peers' framed connections instead (peer/sched_framed.py), one per
    client, the calls dealt round the clients."""
    out: dict[str, Phase] = {}
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with contextlib.AsyncExitStack() as stack:
        s = await stack.enter_async_context(aiohttp.ClientSession(connector=conn))
        links = [FramedTransport(HttpTransport(s, secret), secret)
                 for _ in range(concurrency if framed else 0)]
        for link in links:
            stack.push_async_callback(link.close)
        turn = itertools.count()

        async def post(path: str, body: Any) -> None:
            if links:
                t = links[next(turn) % len(links)]
                await t.post(url, "/api/v1" + path, body, None)
                return
            data = body.model_dump_json().encode()
            headers = {"Content-Type": "application/json"}
            if secret is not None:
                headers[auth.HEADER] = auth.sign(secret, "POST", "/api/v1" + path, data)
            async with s.post(url + "/api/v1" + path, data=data, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{path}: {r.status} {await r.text()}")
                await r.read()

        async def timed(calls: list[Callable[[], Awaitable[Any]]], items: int) -> Phase:
            before = cpu() if cpu is not None else 0.0
            phase = await drive(calls, items, concurrency)
            if cpu is not None:
                phase.cpu = cpu() - before
            return phase

        out["register"] = await timed([lambda r=r: post("/peers", r) for r in w.regs],
                                      len(w.regs))
        for t in w.tasks:
            await post("/tasks", t)
        out["announce"] = await timed([lambda a=a: post("/announce", a) for a in w.announce],
                                      sum(len(a.pieces) for a in w.announce))
        out["announce1"] = await timed([lambda a=a: post("/announce", a) for a in w.announce1],
                                       len(w.announce1))
        for name, reqs in (("schedule1", w.schedule1), ("schedule8", w.schedule8)):
            out[name] = await timed([lambda r=r: post("/schedule", r) for r in reqs],
                                    sum(len(r.pieces) for r in reqs))
    return out


def spawn_scheduler(port: int, redis_url: str | None, workdir: Path,
                    secret: bytes | None, heartbeat_interval: float = 60.0,
                    extra: list[str] | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "naiad", "scheduler", "--listen", f"127.0.0.1:{port}",
            "--udp", "off", "--heartbeat-interval", str(heartbeat_interval), *(extra or [])]
    argv += ["--cluster-secret", secret.decode()] if secret is not None else ["--insecure"]
    if redis_url:
        argv += ["--redis", redis_url]
    log = open(workdir / f"scheduler-{port}.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthy", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError((workdir / f"scheduler-{port}.log").read_text())
        time.sleep(0.05)


def decision_cost(holders: int, per_call: int = 2, crowd: int = 1, decisions: int = 1600
                  ) -> tuple[float, Counter[str]]:
    """Seconds per decision of `ClusterState.schedule` alone for a task of 16 pieces that
    `holders` peers hold whole, asked `per_call` consecutive pieces at a time (a fleet's late
    pieces) by `crowd` requesters in turn, 1 ms apart; and the answers by kind. Past the
    children's share (CHILDREN_PER_HOLDER per usable holder, in flight for a lease timeout) a
    crowd's answers are mostly `holders-busy`, the commonest answer in bench.sim."""
    from scheduler.state import ClusterState

    state = ClusterState(heartbeat_interval=60.0, rng=random.Random(0))
    ids = [f"r{n}" for n in range(crowd)] + [f"p{n}" for n in range(1, holders + 1)]
    for n, pid in enumerate(ids):
        state.register(PeerRegistration(id=pid, upload_addr=f"10.{n >> 16}.{(n >> 8) & 255}."
                                                            f"{n & 255}:1"), 0.0)
    state.ensure_task(TaskRequest(task_id=task_id(0), length=16 * 4 * MiB,
                                  piece_size=4 * MiB), 0.0)
    for n in range(1, holders + 1):
        state.announce(Announce(peer_id=f"p{n}", task_id=task_id(0), pieces=[
            PieceClaim(index=i, chunk=chunk_id(0, i)) for i in range(16)]), 0.0)
    calls = max(1, decisions // per_call)
    reqs = [ScheduleRequest(peer_id=f"r{k % crowd}", task_id=task_id(0),
                            pieces=[(k // crowd + j) % 16 for j in range(per_call)])
            for k in range(calls)]
    kinds: Counter[str] = Counter()
    started = time.perf_counter()
    for k, r in enumerate(reqs):
        for d in state.schedule(r, 1.0 + k / 1000):
            kinds[d.reason if d.action == "wait" and d.reason else d.action] += 1
    return (time.perf_counter() - started) / (per_call * calls), kinds


def median_table(runs: list[dict[str, Phase]]) -> dict[str, dict[str, float]]:
    out = {}
    for name in runs[0]:
        phases = [r[name] for r in runs]
        out[name] = {
            "calls/s": statistics.median(p.calls_per_s for p in phases),
            "items/s": statistics.median(p.items_per_s for p in phases),
            "p50 ms": statistics.median(p.pct(0.50) for p in phases),
            "p99 ms": statistics.median(p.pct(0.99) for p in phases),
            "items/call": phases[0].items / phases[0].calls,
            "cpu us/call": statistics.median(p.cpu / p.calls * 1e6 for p in phases),
        }
    return out


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    cpu = any(row["cpu us/call"] for row in table.values())  # the HTTP runs measure it
    print("| phase | per call | calls/s | announcements or decisions/s | p50 ms | p99 ms |"
          + (" scheduler CPU us/call |" if cpu else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cpu else ""))
    for name, row in table.items():
        print(f"| {name} | {row['items/call']:.0f} | {row['calls/s']:,.0f} | "
              f"{row['items/s']:,.0f} | {row['p50 ms']:.2f} | {row['p99 ms']:.2f} |"
              + (f" {row['cpu us/call']:.0f} |" if cpu else ""))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", choices=["memory", "redis", "both", "none"], default="both",
                    help="stores measured directly (none: only --http)")
    ap.add_argument("--peers", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=1_000)
    ap.add_argument("--pieces", type=int, default=1_000)
    ap.add_argument("--calls", type=int, default=20_000, help="calls per single/schedule phase")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32, help="Redis and HTTP runs")
    ap.add_argument("--http", action="store_true", help="also measure through the HTTP API")
    ap.add_argument("--framed", action="store_true",
                    help="with --http: the calls over framed connections (one per client)")
    ap.add_argument("--unsigned", action="store_true",
                    help="HTTP runs against an --insecure scheduler, calls unsigned (the cost "
                         "of signatures and nonces is the difference)")
    ap.add_argument("--holders", default=None, metavar="N,N,...",
                    help="only: the rule's cost per decision when every piece has N holders "
                         "(ClusterState alone), for each N")
    ap.add_argument("--per-call", default="2", metavar="K,K,...",
                    help="with --holders: pieces per schedule call, for each K")
    ap.add_argument("--crowd", type=int, default=1,
                    help="with --holders: this many requesters ask in turn")
    args = ap.parse_args()
    if args.holders:
        for n in (int(x) for x in args.holders.split(",")):
            for k in (int(x) for x in args.per_call.split(",")):
                cost, kinds = decision_cost(n, k, args.crowd)
                print(f"{n} holders, {k} per call, crowd {args.crowd}: {cost * 1e6:,.1f} us "
                      f"per decision {dict(kinds)}", flush=True)
        return

    print(f"# {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.peers} peers, {args.tasks} tasks x {args.pieces} pieces, "
          f"{args.calls} calls per single-call phase, {args.runs} runs, "
          f"{time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(prefix="naiad-bench-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir) if args.store in ("redis", "both") or args.http else None
        try:
            kinds = {"both": ["memory", "redis"], "none": []}.get(args.store, [args.store])
            for kind in kinds:
                runs = []
                for r in range(args.runs):
                    w = Workload(args.peers, args.tasks, args.pieces, args.calls, seed=r)
                    quiet_gc()
                    if kind == "memory":
                        store: Store = MemoryStore(heartbeat_interval=60.0)
                        concurrency = 1
                    else:
                        assert server is not None
                        await flush(server.url)
                        store = RedisStore.from_url(server.url, heartbeat_interval=60.0)
                        concurrency = args.concurrency
                    await store.start()
                    try:
                        runs.append(await run_store(store, w, concurrency))
                    finally:
                        await store.close()
                    print(f"  {kind} run {r + 1}: " + ", ".join(
                        f"{n} {p.items_per_s:,.0f}/s" for n, p in runs[-1].items()),
                        flush=True)
                print_table(f"{kind} store (median of {args.runs}, {concurrency} in flight)",
                            median_table(runs))
            if args.http:
                for kind in ("memory", "redis"):
                    runs = []
                    for r in range(args.runs):
                        w = Workload(args.peers, args.tasks, args.pieces, args.calls, seed=r)
                        quiet_gc()
                        url = None
                        if kind == "redis":
                            assert server is not None
                            await flush(server.url)
                            url = server.url
                        port = free_port()
                        secret = None if args.unsigned else secrets.token_hex(16).encode()
                        proc = spawn_scheduler(port, url, workdir, secret)
                        try:
                            runs.append(await http_run(
                                f"http://127.0.0.1:{port}", w, args.concurrency, secret,
                                framed=args.framed,
                                cpu=lambda pid=proc.pid: cpu_seconds(pid)))
                        finally:
                            proc.send_signal(signal.SIGINT)
                            proc.wait()
                    print_table(f"{'framed calls' if args.framed else 'HTTP API'}, {kind} "
                                f"store (median of {args.runs}, "
                                f"{args.concurrency} clients, "
                                f"{'unsigned' if args.unsigned else 'signed'})",
                                median_table(runs))
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    asyncio.run(main())
