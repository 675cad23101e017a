"""Control-plane load of a fleet pull, and how many scheduler replicas and state-store shards it
needs.

`--simulate` hosts (asyncio clients in this process) pull one blob of `--size` in pieces of
`--piece-size` from the scheduler's point of view, each through the peer's own code: its
`SchedulerClient` (registration, signed calls, heartbeats as UDP datagrams, the outbox that
coalesces announcements) and the engine's `DecisionBatcher`, asked as the reader's read-ahead
asks (a window of `readahead_pieces` first, then half a window each time the reader is within half
a window of the last piece asked). Fetches take no bytes but are paced at `--host-rate`, so
announcements and refills come in the sizes a real pull makes. Against one real `naiad
scheduler` process over the memory store, one redis-server, or a loopback Redis Cluster.

What one replica serves is measured as pieces (one decision and one announcement each, with the
heartbeats and waits around them) per CPU second of the scheduler process, and one shard's as
pieces per CPU second of redis-server: on a shared two-core machine the load generator competes
with both, so wall-clock rates understate a dedicated core. The fleet demands
hosts x host-rate / piece-size pieces/s.

    python -m bench.fleet --hosts 2600 --size 3GiB --piece-size 4MiB --store redis

The last line: `fleet hosts=H size=S store=K demanded=D/s replica=R/s shard=X/s p99=Yms
replicas=N shards=M` (p99 over the calls that never wait, announcements sent alone; latencies
are seen from the load generator, which shares the machine; for the memory store the state
lives in the replica, so its shard is the replica itself).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import redis
from pydantic import BaseModel

from bench.loopback import cpu_ns
from bench.scheduler import RedisServer, spawn_scheduler, until_ping
from common.limits import DEFAULT
from common.models import (
    AnnounceReply,
    Heartbeat,
    PeerCounters,
    PeerRegistration,
    ScheduleReply,
    TaskRequest,
)
from common.pieces import piece_count
from common.sizes import parse_size
from common.tasks import TaskSet
from peer.engine import ask_plan
from peer.engine.ask_plan import AskPlan, spreads
from peer.engine.batcher import DecisionBatcher
from peer.engine.reader import readahead_pieces
from peer.sched_framed import FramedTransport
from peer.sched_transport import HttpTransport, Transport

try:  # the same bench measures builds from before schedule answers came in parts
    from peer.sched_transport import PARTS as _PARTS
except ImportError:
    _PARTS = None  # type: ignore[assignment]
from peer.scheduler_client import SchedulerClient
from tests.cluster import free_port

R = TypeVar("R", bound=BaseModel)
REGISTRY = "http://registry.fleet:5000"
HEARTBEAT_INTERVAL = 2.0


def parse_rate(text: str) -> float:
    """Bytes/s in `300MB/s` (decimal units, as link speeds are given) or a plain number."""
    t = text.strip().lower().removesuffix("/s")
    for unit, scale in (("gb", 1e9), ("mb", 1e6), ("kb", 1e3)):
        if t.endswith(unit):
            return float(t.removesuffix(unit)) * scale
    return float(parse_size(t))


def demanded(hosts: int, host_rate: float, piece_size: int) -> float:
    """Pieces/s the fleet asks for (each: one decision and one announcement)."""
    return hosts * host_rate / piece_size


def fleet_line(hosts: int, size: str, store: str, demand: float, replica: float,
               shard: float, p99_ms: float) -> str:
    """The report's last line; the number of each is what the demand needs at those rates."""
    replicas = max(1, math.ceil(demand / replica)) if replica > 0 else 0
    shards = max(1, math.ceil(demand / shard)) if shard > 0 else 0
    return (f"fleet hosts={hosts} size={size} store={store} demanded={demand:.0f}/s "
            f"replica={replica:.0f}/s shard={shard:.0f}/s p99={p99_ms:.1f}ms "
            f"replicas={replicas} shards={shards}")


@dataclass
class Tally:
    """What the simulated hosts sent and were told, and how long the non-polling calls took."""

    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("register", "schedule", "announce", "heartbeat", "other"), 0))
    decided: int = 0  # pieces answered parents or source
    waits: int = 0  # pieces answered wait
    announced: int = 0  # piece claims accepted
    latencies: list[float] = field(default_factory=list)  # of calls that never wait
    polls: list[float] = field(default_factory=list)  # of schedule calls (may long-poll)
    want: int = 0  # claims the pulls make in all
    framed: int = 0  # calls that went over a framed connection (the rest: HTTP)
    parts: int = 0  # parts of schedule answers (a scheduler that answers in parts)
    all_announced: asyncio.Event = field(default_factory=asyncio.Event)

    def accepted(self, claims: int) -> None:
        self.announced += claims
        if self.want and self.announced >= self.want:
            self.all_announced.set()

    def p99_ms(self) -> float:
        return pct(self.latencies, 0.99)


def pct(values: list[float], q: float) -> float:
    """The q-quantile of `values` seconds, in ms (0 if none)."""
    lat = sorted(values)
    return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else 0.0


def chunk_of(index: int) -> str:
    return f"blake3:{index:064x}"


class TimedTransport:
    """The peer's HTTP transport, counting and timing every call as the engine sends it. A
    schedule call long-polls (the server holds it while every piece in it must wait), so its
    latency is kept apart from the others': p99 is over the calls that never wait (the
    announcements that go alone)."""

    def __init__(self, inner: Transport, tally: Tally) -> None:
        self.inner = inner
        self.tally = tally

    async def post(self, url: str, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0) -> R | None:
        kind = _KINDS.get(path.rsplit("/", 1)[1], "other")
        framed = getattr(self.inner, "framed", 0)
        sink = _PARTS.get() if _PARTS is not None and kind == "schedule" else None
        token = None
        if sink is not None:  # a schedule call answered in parts: each part counted too
            def counted(part: ScheduleReply) -> None:
                self.tally.parts += 1
                self._decisions(part)
                sink(part)
            token = _PARTS.set(counted)
        t0 = time.perf_counter()
        try:
            out = await self.inner.post(url, path, body, reply, seconds)
        finally:
            if token is not None:
                _PARTS.reset(token)
        took = time.perf_counter() - t0
        self.tally.calls[kind] += 1
        if getattr(self.inner, "framed", 0) > framed:
            self.tally.framed += 1
        if isinstance(out, ScheduleReply):
            self.tally.polls.append(took)
            self._decisions(out)
            return out
        self.tally.latencies.append(took)
        if isinstance(out, AnnounceReply):
            self.tally.accepted(out.accepted)
        return out

    def _decisions(self, out: ScheduleReply) -> None:
        # getattr: the same bench measures builds from before `announce` rode along.
        announced = getattr(out, "announced", None)
        if announced is not None:
            self.tally.accepted(announced.accepted)
        for d in out.decisions:
            if d.action == "wait":
                self.tally.waits += 1
            else:
                self.tally.decided += 1


_KINDS = {"peers": "register", "tasks": "register", "heartbeat": "heartbeat",
          "schedule": "schedule", "announce": "announce"}


class _NothingHeld:
    """The chunk store of a host that starts empty (what re-announcing reads)."""

    def tasks(self) -> list:
        return []

    def drop_task(self, task_id: str) -> None:
        pass


class Host:
    """One simulated peer: the peer's own scheduler client (registration, UDP heartbeats, the
    outbox) and the engine's batcher, fetches paced at the host's rate; nothing is stored."""

    def __init__(self, n: int, url: str, session: aiohttp.ClientSession, secret: bytes,
                 task: TaskRequest, host_rate: float, transport: TimedTransport,
                 idcs: int = 4) -> None:
        self.n = n
        self.task = task
        self.piece_size = task.piece_size or 1
        self.count = piece_count(task.length, self.piece_size)
        self.window = readahead_pieces(self.piece_size)
        self.piece_seconds = self.piece_size / host_rate
        self.idc = f"idc{n % idcs}" if idcs > 1 else ""
        self._link_free = 0.0  # when this host's link has fetched what it was given
        started = time.time()
        reg = PeerRegistration(
            id=f"fleet-{n:05d}", upload_addr=f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}:65002",
            idc=self.idc, started_at=started)
        self.client = SchedulerClient(
            [url], reg, session, _NothingHeld(),  # type: ignore[arg-type]
            lambda: Heartbeat(counters=PeerCounters(started_at=started)), secret,
            transport=transport)

    async def join(self) -> None:
        await self.client.start()
        await self.client.connected.wait()
        await self.client.ensure_task(self.task)

    async def pull(self, tasks: TaskSet) -> None:
        """The whole task as a reader reads it (the reader's own ask plan, ask_plan.py: a
        window asked for, refilled half a window at a time as the reader moves on; once the
        host is fast, three quarters of it drawn ahead with each refill), then sealed."""
        batcher = DecisionBatcher(self.client, self.task.task_id, tasks, lambda _: DEFAULT,
                                  lambda: REGISTRY, _Clock())
        fetching: dict[int, asyncio.Task[None]] = {}
        loop = asyncio.get_running_loop()
        plan = AskPlan(self.count, self.window, 0, random.Random(self.n).randrange,
                       spread=spreads(True, self.idc), piece_size=self.piece_size,
                       since=loop.time())

        def start(j: int) -> bool:
            if j in fetching:
                return False
            fetching[j] = tasks.spawn(self._obtain(j, batcher, plan))
            return True
        for k in range(self.count):
            for j in plan.reached(k):
                start(j)
            plan.top_up(start, loop.time())  # the spread share rides the refill's call
            await fetching.pop(k)
        self.client.sealed(self.task.task_id, REGISTRY)

    async def _obtain(self, index: int, batcher: DecisionBatcher, plan: AskPlan) -> None:
        decision = await batcher.decide(index, frozenset())
        loop = asyncio.get_running_loop()
        self._link_free = max(loop.time(), self._link_free) + self.piece_seconds
        await asyncio.sleep(self._link_free - loop.time())
        plan.arrived(index, self.piece_size)
        self.client.announce(self.task.task_id, index, chunk_of(index), REGISTRY,
                             "origin" if decision.action == "source" else "peer")


class _Clock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass
class Measured:
    seconds: float
    tally: Tally
    scheduler_cpu: float
    store_cpu: float  # redis-server(s); 0 for the memory store
    hosts_done: int


async def replay(url: str, secret: bytes, task: TaskRequest, simulate: int,
                 host_rate: float, seconds: float,
                 cpu: Callable[[], tuple[float, float]], framed: bool = True,
                 idcs: int = 4) -> Measured:
    """Join `simulate` hosts, then time their pulls (at most `seconds`) until every piece is
    decided and announced. `framed`: each host calls over its own framed connection where
    the scheduler offers one (as a peer does), else every call is HTTP. `idcs`: the hosts
    spread over this many IDCs in turn (1: none given)."""
    tally = Tally()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        http = HttpTransport(session, secret)
        inner: list[Transport] = [FramedTransport(http, secret) if framed else http
                                  for _ in range(simulate)]
        timed = [TimedTransport(t, tally) for t in inner]
        hosts = [Host(n, url, session, secret, task, host_rate, timed[n], idcs)
                 for n in range(simulate)]
        tasks = TaskSet("fleet")
        try:
            await asyncio.gather(*(h.join() for h in hosts))
            tally = Tally()  # what the pulls send, without the joins
            for t in timed:
                t.tally = tally
            sched0, store0 = cpu()
            started = time.perf_counter()
            tally.want = simulate * hosts[0].count
            pulls = [tasks.spawn(h.pull(tasks), f"pull-{h.n}") for h in hosts]
            announced = asyncio.create_task(tally.all_announced.wait())
            finished, _ = await asyncio.wait([*pulls, announced], timeout=seconds,
                                             return_when=asyncio.ALL_COMPLETED)
            elapsed = time.perf_counter() - started
            sched1, store1 = cpu()
            announced.cancel()
            for t in finished:
                if t is not announced:
                    t.result()  # a pull that failed fails the run
            done = sum(1 for t in pulls if t in finished)
        finally:
            await tasks.close()
            for h in hosts:
                await h.client.stop(leave=False)
            for t in inner:
                if isinstance(t, FramedTransport):
                    await t.close()
    return Measured(elapsed, tally, sched1 - sched0, store1 - store0, done)


class RedisCluster:
    """`masters` redis-server processes in cluster mode on loopback, slots spread over them
    (no replicas: the bench measures the masters' work)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or cli is None:
            raise SystemExit("redis-server and redis-cli are needed (apt-get install "
                             "redis-server)")
        self.ports = [free_port() for _ in range(masters)]
        self.url = f"redis://127.0.0.1:{self.ports[0]}"
        self.procs = []
        for port in self.ports:
            d = workdir / f"cluster-{port}"
            d.mkdir()
            log = open(d / "redis.log", "wb")  # noqa: SIM115 - handed to the child
            self.procs.append(subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled",
                 "yes", "--cluster-config-file", str(d / "nodes.conf"), "--save", "",
                 "--appendonly", "no"], cwd=d, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        for port, proc in zip(self.ports, self.procs, strict=True):
            until_ping(port, proc)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True,
                       stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        for port in self.ports:  # every node, not just the first, knows the slots
            client = redis.Redis(port=port)
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not become ok")
                time.sleep(0.05)
            client.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def has_flag(flag: str) -> bool:
    """Whether this `naiad scheduler` knows a flag (the Redis Cluster one is new)."""
    out = subprocess.run([sys.executable, "-m", "naiad", "scheduler", "--help"],
                         capture_output=True, text=True, check=False).stdout
    return flag in out


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=2600, help="hosts in the fleet")
    ap.add_argument("--size", default="3GiB", help="bytes each host pulls")
    ap.add_argument("--piece-size", default="4MiB")
    ap.add_argument("--store", choices=["memory", "redis", "redis-cluster"], default="memory")
    ap.add_argument("--host-rate", default="300MB/s", help="each host's pull rate")
    ap.add_argument("--simulate", type=int, default=64,
                    help="hosts simulated (at most --hosts): enough to load one replica")
    ap.add_argument("--transport", choices=["framed", "http"], default="framed",
                    help="how the simulated peers call the scheduler: framed where it is "
                         "offered (as peers do), or HTTP only")
    ap.add_argument("--idcs", type=int, default=4,
                    help="IDCs the simulated hosts are spread over (1: none given)")
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="the measurement ends after this long, or once every host pulled")
    ap.add_argument("--spread", action="store_true",
                    help="the reader's spread share on (ask_plan.py SPREAD: on by default "
                         "since stop 26; a host with an IDC label never spreads: --idcs 1)")
    ap.add_argument("--spread-idc", action="store_true",
                    help="hosts with an IDC label spread too (ask_plan.py SPREAD_IDC, off by "
                         "default)")
    args = ap.parse_args(argv)
    if args.spread:
        ask_plan.SPREAD = True
    if args.spread_idc:
        ask_plan.SPREAD = ask_plan.SPREAD_IDC = True
    size, piece_size = parse_size(args.size), parse_size(args.piece_size)
    host_rate = parse_rate(args.host_rate)
    simulate = max(1, min(args.simulate, args.hosts))
    task = TaskRequest(task_id=f"sha256:{secrets.token_hex(32)}", length=size,
                       piece_size=piece_size)
    print(f"# {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {simulate} of {args.hosts} hosts simulated, "
          f"{piece_count(size, piece_size)} pieces each, store {args.store}", flush=True)
    if args.store == "redis-cluster" and not has_flag("--redis-cluster"):
        print("redis-cluster: not available yet (this naiad scheduler has no --redis-cluster)")
        return 2
    with tempfile.TemporaryDirectory(prefix="naiad-fleet-") as tmp:
        workdir = Path(tmp)
        backend: RedisServer | RedisCluster | None = None
        flags: list[str] = []
        store_pids: list[int] = []
        if args.store == "redis":
            backend = RedisServer(workdir)
            flags, store_pids = ["--redis", backend.url], [backend.proc.pid]
        elif args.store == "redis-cluster":
            backend = RedisCluster(workdir)
            flags, store_pids = ["--redis-cluster", backend.url], backend.pids
        secret = secrets.token_hex(16).encode()
        port = free_port()
        flags += ["--udp", f"127.0.0.1:{free_port()}"]  # heartbeats as peers send them
        proc = spawn_scheduler(port, None, workdir, secret, heartbeat_interval=HEARTBEAT_INTERVAL,
                               extra=flags)
        try:
            def cpu() -> tuple[float, float]:
                # schedstat's nanoseconds: a small run's CPU is a few of /proc/PID/stat's 10 ms
                # ticks, and read as 0 s it measured nothing (a test's 0.2 s pull did, 1 in 6)
                return cpu_ns(proc.pid) / 1e9, sum(cpu_ns(p) for p in store_pids) / 1e9

            m = await replay(f"http://127.0.0.1:{port}", secret, task, simulate, host_rate,
                             args.seconds, cpu, framed=args.transport == "framed",
                             idcs=args.idcs)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            if backend is not None:
                backend.stop()
            logged = (workdir / f"scheduler-{port}.log").read_text(errors="replace")
            if "Traceback" in logged:  # the run's figures stand, but say what went wrong
                first = logged[logged.index("Traceback"):][:3000]
                print(f"  the scheduler logged {logged.count('Traceback')} tracebacks; the "
                      f"first:\n{first}", file=sys.stderr)
    t = m.tally
    pieces = min(t.decided, t.announced)
    calls = sum(t.calls.values())
    print(f"  {m.seconds:.1f} s, {m.hosts_done}/{simulate} pulls complete; calls: "
          + ", ".join(f"{k} {v}" for k, v in t.calls.items())
          + f" ({t.framed} framed, {t.parts} parts of schedule answers); pieces decided "
          f"{t.decided} (+{t.waits} waits), announced {t.announced}")
    print(f"  latency: calls that never wait p50 {pct(t.latencies, 0.5):.1f} ms p99 "
          f"{t.p99_ms():.1f} ms ({len(t.latencies)}); schedule calls, long polls included, "
          f"p50 {pct(t.polls, 0.5):.1f} ms p99 {pct(t.polls, 0.99):.1f} ms")
    print(f"  wall: {pieces / m.seconds:,.0f} pieces/s, {calls / m.seconds:,.0f} calls/s; "
          f"scheduler CPU {m.scheduler_cpu:.2f} s"
          + (f", store CPU {m.store_cpu:.2f} s" if store_pids else ""))
    if pieces == 0 or m.scheduler_cpu <= 0:
        print("no pieces measured")
        return 1
    replica = pieces / m.scheduler_cpu
    shard = pieces / m.store_cpu if store_pids and m.store_cpu > 0 else replica
    print(fleet_line(args.hosts, args.size, args.store,
                     demanded(args.hosts, host_rate, piece_size), replica, shard, t.p99_ms()))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
