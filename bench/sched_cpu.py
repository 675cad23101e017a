"""The scheduler's own CPU per HTTP call: `bench/scheduler.py --http`'s memory-store phases
(its workload, its scheduler process, its signed clients), with the scheduler process's user +
system CPU read from /proc around each phase. On a 2-core machine the load generator takes
about a core itself, so calls/s say as much about the client as about the scheduler; µs of
scheduler CPU per call is the figure that is the replica's own.

    python bench/sched_cpu.py --runs 3 --calls 10000 --tasks 200
    python bench/sched_cpu.py --runs 1 --py-spy /tmp/sched.txt    # a raw profile as well
    python bench/sched_cpu.py --against /tmp/old-export           # A/B, paired
    python bench/sched_cpu.py --edge                              # in process, no sockets
    python bench/sched_cpu.py --floor                             # a bare app: aiohttp's own

With --against, two schedulers run at once, this tree's and the one of the tree named, and
every phase's calls go to both in alternating blocks (the same calls, so the same state on
both): whatever else loads the machine loads both sides alike.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scheduler as sb
from bench.loopback import cpu_ns, cpu_seconds, user_system_seconds
from tests.cluster import free_port, wait_http


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


def spawn_in(tree: Path, port: int, workdir: Path, secret: bytes | None
             ) -> subprocess.Popen:
    """bench/scheduler.py's scheduler process, run from `tree` (`-m` looks in the cwd)."""
    here, env = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(tree)
    os.environ["PYTHONPATH"] = str(tree)
    try:
        return sb.spawn_scheduler(port, None, workdir, secret)
    finally:
        os.chdir(here)
        if env is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env


async def paired(seed: int, args: argparse.Namespace, workdir: Path
                 ) -> dict[str, tuple[float, float]]:
    """Per phase: (this tree's µs per call, the other's), the same calls to both."""
    import aiohttp

    from common import auth

    w = sb.Workload(args.peers, args.tasks, args.pieces, args.calls, seed=seed)
    sb.quiet_gc()
    secret = None if args.unsigned else secrets.token_hex(16).encode()
    trees = [Path(__file__).resolve().parent.parent, Path(args.against).resolve()]
    procs, urls = [], []
    for tree in trees:
        port = free_port()
        procs.append(spawn_in(tree, port, workdir, secret))
        urls.append(f"http://127.0.0.1:{port}/api/v1")
    out: dict[str, tuple[float, float]] = {}
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=2 * args.concurrency)) as s:
            async def post(url: str, path: str, body: Any) -> None:
                data = body.model_dump_json().encode()
                headers = {"Content-Type": "application/json"}
                if secret is not None:
                    headers[auth.HEADER] = auth.sign(secret, "POST", "/api/v1" + path, data)
                async with s.post(url + path, data=data, headers=headers) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{path}: {r.status} {await r.text()}")
                    await r.read()

            async def phase(path: str, bodies: list[Any]) -> tuple[float, float]:
                spent = [0, 0]
                for k, first in enumerate(range(0, len(bodies), args.block)):
                    block = bodies[first:first + args.block]
                    for side in ((0, 1) if k % 2 == 0 else (1, 0)):
                        before = cpu_ns(procs[side].pid)
                        await sb.drive([lambda b=b, u=urls[side]: post(u, path, b)
                                        for b in block], len(block), args.concurrency)
                        spent[side] += cpu_ns(procs[side].pid) - before
                return spent[0] / len(bodies) / 1e3, spent[1] / len(bodies) / 1e3

            out["register"] = await phase("/peers", w.regs)
            for t in w.tasks:
                for url in urls:
                    await post(url, "/tasks", t)
            out["announce"] = await phase("/announce", w.announce)
            out["announce1"] = await phase("/announce", w.announce1)
            out["schedule1"] = await phase("/schedule", w.schedule1)
            out["schedule8"] = await phase("/schedule", w.schedule8)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.wait()
    return out


async def main_paired(args: argparse.Namespace) -> None:
    runs = []
    with tempfile.TemporaryDirectory(prefix="naiad-cpu-") as tmp:
        for r in range(args.runs):
            runs.append(await paired(r, args, Path(tmp)))
            print(f"  run {r + 1}: " + ", ".join(f"{n} {a:.0f}/{b:.0f}us"
                                                 for n, (a, b) in runs[-1].items()), flush=True)
    print(f"\n| phase | scheduler CPU µs per call, this tree | {args.against} | change |")
    print("|---|---|---|---|")
    for name in runs[0]:
        a = statistics.median(r[name][0] for r in runs)
        b = statistics.median(r[name][1] for r in runs)
        print(f"| {name} | {a:.1f} | {b:.1f} | {100 * (a - b) / b:+.0f} % |")


class _Body:
    """A request body already received: what aiohttp's StreamReader hands `request.read()`."""

    def __init__(self, data: bytes) -> None:
        self._chunks = [b"", data]

    def set_read_chunk_size(self, size: int) -> None:
        pass

    async def readany(self) -> bytes:
        return self._chunks.pop()


BATCH = 100


async def edge_costs(args: argparse.Namespace) -> None:
    """µs per call from the app's router to the handler's response (middlewares, signature,
    parsing, store, encoding), in process: no socket, no HTTP parsing, no loop wake-ups, so
    a change to the edge shows without most of the machine's noise: each figure is the best
    batch of --batches (the same calls again and again: a store cost that stays put)."""
    import time

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from common import auth
    from scheduler.api import SchedulerAPI
    from scheduler.store import MemoryStore

    w = sb.Workload(1000, 20, args.pieces, 2000, seed=0)
    secret = secrets.token_hex(16).encode()
    store = MemoryStore(heartbeat_interval=60.0)
    app = SchedulerAPI(store, scheduler_id="bench", secret=secret).app()
    runner = web.AppRunner(app)
    await runner.setup()  # frozen and started, as a server's
    for r in w.regs:
        await store.register(r)
    for t in w.tasks:
        await store.ensure_task(t)
    for a in w.announce:
        await store.announce(a)

    def requests(calls: list[tuple[str, Any]]) -> list[Any]:
        out = []
        for path, body in calls:
            data = body.model_dump_json().encode()
            req = make_mocked_request("POST", "/api/v1" + path, headers={
                "Content-Type": "application/json", "Content-Length": str(len(data)),
                auth.HEADER: auth.sign(secret, "POST", "/api/v1" + path, data)},
                app=app, payload=_Body(data))  # type: ignore[arg-type]
            out.append(req)
        return out

    beats = [(f"/peers/{pid}/heartbeat", hb) for pid, hb in w.heartbeats]
    kinds = {"heartbeat": beats, "announce16": [("/announce", a) for a in w.announce[:2000]],
             "announce1": [("/announce", a) for a in w.announce1],
             "schedule1": [("/schedule", r) for r in w.schedule1],
             "schedule8": [("/schedule", r) for r in w.schedule8]}
    print(f"| call | µs per call, router to response (best of {args.batches} batches of "
          f"{BATCH}) |\n|---|---|")
    for name, calls in kinds.items():
        best = float("inf")
        for k in range(args.batches):
            first = k * BATCH % len(calls)
            reqs = requests(calls[first:first + BATCH])
            started = time.perf_counter()
            for req in reqs:
                resp = await app._handle(req)
                if resp.status != 200:
                    raise RuntimeError(f"{name}: {resp.status} {resp.body!r}")
            best = min(best, (time.perf_counter() - started) / len(reqs))
        print(f"| {name} | {best * 1e6:.1f} |", flush=True)
    await runner.cleanup()


async def serve_bare(port: int) -> None:
    """aiohttp's own cost: one POST route answering constant bytes, on `common.web.Server`
    (the scheduler's server, connection counting and all) with no middleware."""
    from aiohttp import web

    from common.web import Server

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"decisions":[]}', content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/schedule", answer)
    server = Server(app, f"127.0.0.1:{port}")
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


async def floor(args: argparse.Namespace) -> None:
    """The bare app's CPU per call under the HTTP bench's schedule8 calls (signed, though
    nothing checks them), 32 clients: what any aiohttp route costs before its handler."""
    import aiohttp

    from common import auth

    w = sb.Workload(100, 20, args.pieces, args.calls, seed=0)
    secret = secrets.token_hex(16).encode()
    for r in range(args.runs):
        port = free_port()
        proc = _spawn_bare(port)
        try:
            await wait_http(f"http://127.0.0.1:{port}/api/v1/schedule", ok=(405,))  # POST only
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=args.concurrency)) as s:
                url = f"http://127.0.0.1:{port}/api/v1/schedule"

                async def post(body: Any, s: aiohttp.ClientSession = s, url: str = url
                               ) -> None:
                    data = body.model_dump_json().encode()
                    headers = {"Content-Type": "application/json",
                               auth.HEADER: auth.sign(secret, "POST", "/api/v1/schedule",
                                                      data)}
                    async with s.post(url, data=data, headers=headers) as resp:
                        await resp.read()

                calls = [lambda b=b: post(b) for b in w.schedule8]
                await sb.drive(calls[:1000], 1000, args.concurrency)  # warm
                before, user = cpu_ns(proc.pid), user_system_seconds(proc.pid)
                phase = await sb.drive(calls, len(calls), args.concurrency)
                spent = cpu_ns(proc.pid) - before
                u, k = (a - b for a, b in zip(user_system_seconds(proc.pid), user, strict=True))
        finally:
            proc.terminate()
            proc.wait()
        n = len(calls)
        print(f"  run {r + 1}: {phase.calls_per_s:,.0f} calls/s, bare app CPU "
              f"{spent / n / 1e3:.1f} us per call (user {u / n * 1e6:.1f}, sys "
              f"{k / n * 1e6:.1f})", flush=True)


def _spawn_bare(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port)])


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
    ap.add_argument("--against", default=None, metavar="TREE",
                    help="A/B: the same calls also to a scheduler run from TREE (an export)")
    ap.add_argument("--block", type=int, default=500, help="calls per block with --against")
    ap.add_argument("--batches", type=int, default=40, help="with --edge")
    ap.add_argument("--edge", action="store_true",
                    help="in process: the app's cost per call from router to response")
    ap.add_argument("--floor", action="store_true",
                    help="a bare aiohttp app's CPU per call (aiohttp's own cost)")
    ap.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare is not None:
        await serve_bare(args.serve_bare)
        return
    if args.floor:
        await floor(args)
        return
    if args.edge:
        await edge_costs(args)
        return
    if args.against:
        await main_paired(args)
        return
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
