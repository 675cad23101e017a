"""The Redis store's CPU per call in the replica, without HTTP: a fleet pull's calls on one task.

`--peers` peers pull one task of `--pieces` 4 MiB pieces in step: each round, every peer asks for
its next 2 pieces and tells of its last 2 (a schedule call carrying claims, as the outbox sends
them), all at once, against one redis-server started here. `--seeds` peers hold every piece from
the start, so decisions find parents. `--mode one` makes each call `announce_and_schedule` (one
store operation), `--mode two` an `announce` then a `schedule` (what the API did before, and
does for a store without it). Printed: this process's CPU per call and pieces per CPU-second
(the load is generated in-process too, but it is a few model constructions per call).

    python -m bench.redis_calls --mode one|two [--peers 64 --pieces 200 --seeds 4 --idcs 0]
        [--window 2 --spread consecutive|runs|scattered] [--lessees 0]

`--window K --spread` sets which K pieces each call asks for (and claims the call after):
consecutive ones, two runs half the task apart, or scattered; the same count either way, so
a call's cost should not change with the spread. redis-server's CPU per call is printed too.
`--lessees N`: before the pull N more peers each lease one piece past those pulled and keep
it (live through the pull): the pull's calls name none of them, so a call's cost should not
grow with N (a fleet on the origin, or the spread share, keeps many runs leased at once).

`--holders N` measures a decision on a piece many peers hold instead (a fleet pull's late
pieces): N peers hold every one of `--pieces` pieces, then `--peers` requesters each ask for
one piece a round, `--rounds` rounds (each decision admits its requester as a child in flight).
Printed: CPU per decision (this process's and redis-server's) and the bytes each decision sent
to Redis (script arguments, reads and writes) and read back, from the store's own script calls;
then the same per claim, each requester claiming the pieces it was handed.

    python -m bench.redis_calls --holders 2600 --pieces 64 [--peers 64 --rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import tempfile
import time
from pathlib import Path

from bench import loopback
from common.models import Announce, PeerRegistration, PieceClaim, ScheduleRequest, TaskRequest
from common.pieces import MiB
from scheduler.redis_store import RedisStore
from tests.redis_servers import RedisServer

TASK = "sha256:" + "e" * 64


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def chunk(i: int) -> str:
    return f"blake3:{i:064x}"


def claims(indices: range) -> list[PieceClaim]:
    return [PieceClaim(index=i, chunk=chunk(i)) for i in indices]


def spread(how: str, pieces: int, k: int, rng: random.Random) -> list[int]:
    """The order in which one peer asks for the `pieces`, `k` a call: `consecutive` runs of k,
    `runs` half of each call's k from the first half of the task and half from as far into the
    second (two runs pieces/2 apart, as a fast reader's spread share draws ahead), `scattered`
    k pieces anywhere (the peer's own random order)."""
    if how == "consecutive":
        return list(range(pieces))
    if how == "scattered":
        order = list(range(pieces))
        rng.shuffle(order)
        return order
    half, h = pieces // 2, max(1, k // 2)
    order = []
    for r in range(0, half, h):
        order += [*range(r, min(r + h, half)), *range(half + r, min(half + r + h, pieces))]
    return order


async def pull(url: str, args: argparse.Namespace, shard: int) -> None:
    # With lessees their leases must stay live through the pull (progress is by the clock).
    s = RedisStore.from_url(url, heartbeat_interval=60.0,
                            lease_timeout=600.0 if args.lessees else 2.0,
                            rng=random.Random(1))
    peers = [f"p{i:04d}" for i in range(args.peers)]
    seeds = [f"s{i}" for i in range(args.seeds)]
    lessees = [f"l{i:05d}" for i in range(args.lessees)]
    for n, pid in enumerate(peers + seeds + lessees):
        await s.register(PeerRegistration(
            id=pid, upload_addr=f"10.{n // 62500}.{n // 250 % 250}.{n % 250}:65002",
            upload_slots=64, idc=f"idc{n % args.idcs}" if args.idcs else ""))
    await s.ensure_task(TaskRequest(task_id=TASK, length=(args.pieces + args.lessees) * 4 * MiB,
                                    piece_size=4 * MiB))
    for n in range(0, len(lessees), 64):  # each leases one piece past those pulled, keeps it
        for ds in await asyncio.gather(*(
                s.schedule(ScheduleRequest(peer_id=pid, task_id=TASK, pieces=[args.pieces + m]))
                for m, pid in enumerate(lessees[n:n + 64], n))):
            assert ds[0].action == "source", ds
    for seed in seeds:
        await s.announce(Announce(peer_id=seed, task_id=TASK,
                                  pieces=claims(range(args.pieces))))

    k = args.window
    order = {pid: spread(args.spread, args.pieces, k, random.Random(n))
             for n, pid in enumerate(peers)}

    async def step(pid: str, r: int) -> None:
        mine = order[pid]
        ann = Announce(peer_id=pid, task_id=TASK,
                       pieces=[PieceClaim(index=i, chunk=chunk(i))
                               for i in sorted(mine[max(0, r - 1) * k:r * k])])
        req = ScheduleRequest(peer_id=pid, task_id=TASK, pieces=mine[r * k:(r + 1) * k],
                              announce=ann if r else None)
        if not r:
            await s.schedule(req)
        elif args.mode == "one":
            await s.announce_and_schedule(ann, req)
        else:
            await s.announce(ann)
            await s.schedule(req)

    calls = 0
    cpu, wall, redis_cpu = cpu_seconds(), time.perf_counter(), loopback.cpu_seconds(shard)
    for r in range(args.pieces // k):
        await asyncio.gather(*(step(pid, r) for pid in peers))
        calls += len(peers)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    redis_cpu = loopback.cpu_seconds(shard) - redis_cpu
    print(f"mode={args.mode} spread={args.spread} window={k} peers={args.peers} "
          f"seeds={args.seeds} lessees={args.lessees} idcs={args.idcs} calls={calls} "
          f"cpu={cpu:.2f}s wall={wall:.2f}s cpu/call={1e3 * cpu / calls:.3f}ms "
          f"redis-cpu/call={1e3 * redis_cpu / calls:.3f}ms pieces/cpu-s={k * calls / cpu:,.0f}")
    await s.close()


class Bytes:
    """Bytes through one of the store's script batchers (`RedisStore.read`, `.apply`)."""

    def __init__(self, call) -> None:
        self.call = call
        self.sent = self.back = 0

    async def __call__(self, key: str, arg: str):
        self.sent += len(arg)
        reply = await self.call(key, arg)
        self.back += len(reply) if isinstance(reply, str) else 0
        return reply


async def holders(url: str, args: argparse.Namespace, shard: int) -> None:
    """Decisions on pieces `args.holders` peers hold; `shard`: redis-server's pid."""
    s = RedisStore.from_url(url, heartbeat_interval=600.0, lease_timeout=2.0,
                            rng=random.Random(1))
    crowd = [f"holder-{i:06d}" for i in range(args.holders)]  # ids of 13 characters
    peers = [f"p{i:04d}" for i in range(args.peers)]

    async def batched(calls) -> None:
        calls = list(calls)
        for n in range(0, len(calls), 64):
            await asyncio.gather(*calls[n:n + 64])
    await batched(s.register(PeerRegistration(
        id=pid, upload_addr=f"10.{n // 62500}.{n // 250 % 250}.{n % 250}:65002",
        upload_slots=64)) for n, pid in enumerate(crowd + peers))
    await s.ensure_task(TaskRequest(task_id=TASK, length=args.pieces * 4 * MiB,
                                    piece_size=4 * MiB))
    await batched(s.announce(Announce(peer_id=pid, task_id=TASK,
                                      pieces=claims(range(args.pieces)))) for pid in crowd)
    read, apply = Bytes(s.read), Bytes(s.apply)
    s.read, s.apply = read, apply  # type: ignore[assignment]
    decisions = 0
    actions: dict[str, int] = {}
    cpu, wall, redis_cpu = cpu_seconds(), time.perf_counter(), loopback.cpu_seconds(shard)
    for r in range(args.rounds):
        answers = await asyncio.gather(*(
            s.schedule(ScheduleRequest(peer_id=pid, task_id=TASK,
                                       pieces=[(r + n) % args.pieces]))
            for n, pid in enumerate(peers)))
        for ds in answers:
            for d in ds:
                actions[d.action] = actions.get(d.action, 0) + 1
        decisions += len(peers)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    redis_cpu = loopback.cpu_seconds(shard) - redis_cpu
    print(f"holders={args.holders} pieces={args.pieces} requesters={args.peers} "
          f"decisions={decisions} {actions} cpu={cpu:.2f}s wall={wall:.2f}s "
          f"cpu/decision={1e3 * cpu / decisions:.3f}ms "
          f"redis-cpu/decision={1e3 * redis_cpu / decisions:.3f}ms "
          f"read: sent={read.sent / decisions:,.0f} B back={read.back / decisions:,.0f} B "
          f"write: sent={apply.sent / decisions:,.0f} B per decision")
    # Then each requester claims the pieces it was handed: a claim on a piece N peers hold.
    read.sent = read.back = apply.sent = 0
    cpu, redis_cpu = cpu_seconds(), loopback.cpu_seconds(shard)
    claimed = 0
    for n, pid in enumerate(peers):
        mine = sorted({(r + n) % args.pieces for r in range(args.rounds)})
        await asyncio.gather(*(s.announce(Announce(peer_id=pid, task_id=TASK,
                                                   pieces=claims(range(i, i + 1))))
                               for i in mine))
        claimed += len(mine)
    cpu, redis_cpu = cpu_seconds() - cpu, loopback.cpu_seconds(shard) - redis_cpu
    print(f"claims={claimed} cpu/claim={1e3 * cpu / claimed:.3f}ms "
          f"redis-cpu/claim={1e3 * redis_cpu / claimed:.3f}ms "
          f"read: sent={read.sent / claimed:,.0f} B back={read.back / claimed:,.0f} B "
          f"write: sent={apply.sent / claimed:,.0f} B per claim")
    await s.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.redis_calls",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["one", "two"], default="one")
    ap.add_argument("--peers", type=int, default=64)
    ap.add_argument("--pieces", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--idcs", type=int, default=0, help="IDC labels, round robin (0: none)")
    ap.add_argument("--lessees", type=int, default=0,
                    help="peers holding a live lease each on a piece past those pulled")
    ap.add_argument("--window", type=int, default=2, help="pieces each call asks for")
    ap.add_argument("--spread", choices=["consecutive", "runs", "scattered"],
                    default="consecutive", help="which pieces a call asks for (spread())")
    ap.add_argument("--holders", type=int, default=0,
                    help="decisions on pieces this many peers hold (0: the pull in step)")
    ap.add_argument("--rounds", type=int, default=10, help="with --holders")
    args = ap.parse_args()
    server = RedisServer(Path(tempfile.mkdtemp(prefix="naiad-redis-calls-")))
    server.wait_ready()
    try:
        asyncio.run(holders(server.url, args, server.proc.popen.pid) if args.holders
                    else pull(server.url, args, server.proc.popen.pid))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
