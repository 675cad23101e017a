"""The assembled engine (peer/engine/) driven in-process through its seams: a scripted
scheduler, parents and an origin as plain objects, a clock that jumps instead of sleeping, the
real ChunkStore on a temporary directory. Every acquisition path end to end, each test well
under a second; the rules alone are in test_engine_acquire.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common import ids
from common.limits import DEFAULT, ON_DEMAND
from common.metrics import PeerMetrics
from common.models import Decision, ParentRef, TaskMeta, TaskRequest
from common.pieces import PieceLayout
from common.ranges import ByteRange
from peer.engine import (
    BUSY_PATIENCE,
    ON_DEMAND_WAIT,
    ORIGIN_ATTEMPTS,
    OUTAGE_STALL,
    BlobCorrupt,
    Engine,
    PieceUnavailable,
    TaskRun,
)
from peer.engine.storing import FULL_BACKOFF, OPEN_HOLD
from peer.origin import OriginError, OriginRequest
from peer.parents import ParentError
from peer.sched_transport import SchedulerUnavailable
from peer.store import CannotStore, ChunkStore

PIECE = 64 << 10
REQ = OriginRequest(url="https://registry.test/v2/r/blobs/x", registry="https://registry.test")
A, B, C = (ParentRef(id=n, addr=f"{n}.test:4001") for n in "abc")

# A scheduler's answer for one piece: (piece, exclude, call number) -> decision.
Policy = Callable[[int, set[str], int], Decision]


class Clock:
    """Monotonic time that jumps: sleeping moves it on at once. Sleepers that start together
    wake together (each moves time to its own wake-up, not on by its own wait)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        wake = self.t + seconds
        await asyncio.sleep(0)
        self.t = max(self.t, wake)


class Scheduler:
    """The Scheduler seam, scripted: `policy` answers each piece of each schedule call;
    `down` makes every call fail as unreachable; `back_after` is when a lost one answers
    again (wait_back moves the clock on by what it waits)."""

    def __init__(self, clock: Clock, policy: Policy) -> None:
        self.clock = clock
        self.policy = policy
        self.down = False
        self.lost_recently = False
        self.back_at: float | None = None
        self.calls: list[tuple[list[int], set[str], int]] = []
        self.reports: list[tuple[str, int | None, str]] = []
        self.announced: dict[int, str] = {}
        self.sources: dict[int, str] = {}  # piece -> where its announced copy came from
        self.withdrawn: list[list[int] | None] = []
        self.progressed: list[int] = []
        self.mismatches = 0
        self.ensured = 0
        self.silent = False  # nothing but decision calls is answered (longest_silence)
        self.answered: float | None = None
        self.sealed_now = asyncio.Event()

    async def ensure_task(self, req: TaskRequest) -> TaskMeta:
        self.ensured += 1
        await asyncio.sleep(0)
        if self.down:
            raise SchedulerUnavailable("down")
        return TaskMeta(task_id=req.task_id, length=req.length,
                        piece_size=req.piece_size or PIECE, digest=req.digest, sealed=True)

    async def schedule(self, task_id: str, pieces: list[int], exclude: set[str],
                       wait_ms: int, registry: str | None = None,
                       part: object = None) -> list[Decision]:  # answers in one
        await asyncio.sleep(0)
        if self.down:
            raise SchedulerUnavailable("down")
        self.calls.append((pieces, set(exclude), wait_ms))
        self.answered = self.clock.t
        answers = [self.policy(p, exclude, len(self.calls)) for p in pieces]
        if all(d.action == "wait" for d in answers):
            self.clock.t += wait_ms / 1000  # the long poll ran its course
        return answers

    def report(self, parent_id: str, task_id: str, piece: int | None, kind: str) -> None:
        self.reports.append((parent_id, piece, kind))

    async def wait_back(self, seconds: float) -> bool:
        if not self.down:
            return True
        if not self.lost_recently:
            return False
        if self.back_at is not None and self.clock.t + seconds >= self.back_at:
            await self.clock.sleep(self.back_at - self.clock.t)
            self.down = False
            return True
        await self.clock.sleep(seconds)
        return False

    def recently_lost(self) -> bool:
        return self.down and self.lost_recently

    def longest_silence(self, since: float) -> float:
        if not (self.down or self.silent):
            return 0.0
        return self.clock.t - max(since, self.answered if self.answered is not None else since)

    def announce(self, task_id: str, index: int, chunk: str,
                 registry: str | None = None, source: str = "origin") -> None:
        self.announced[index] = chunk
        self.sources[index] = source

    def withdraw(self, task_id: str, pieces: list[int] | None) -> None:
        self.withdrawn.append(pieces)

    def blob_mismatch(self, task_id: str, registry: str | None = None) -> None:
        self.mismatches += 1

    def progress(self, task_id: str, epoch: int) -> None:
        self.progressed.append(epoch)

    def sealed(self, task_id: str, registry: str | None = None) -> None:
        self.sealed_now.set()


@dataclass
class Blob:
    data: bytes
    layout: PieceLayout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = PieceLayout(len(self.data), PIECE)

    @property
    def digest(self) -> str:
        return ids.SHA256_PREFIX + hashlib.sha256(self.data).hexdigest()

    def piece(self, i: int) -> bytes:
        start, size = self.layout.span(i)
        return self.data[start:start + size]

    def chunk(self, i: int) -> str:
        return ids.chunk_id(self.piece(i))

    def by_chunk(self) -> dict[str, bytes]:
        return {self.chunk(i): self.piece(i) for i in range(self.layout.count)}


class Parents:
    """The ChunkSource seam: each parent by address is `ok`, `corrupt` (bytes of the right
    size, wrong content), or raises the ParentError of that kind (busy, slow, failed)."""

    def __init__(self, blob: Blob) -> None:
        self.chunks = blob.by_chunk()
        self.behaviour: dict[str, str] = {}
        self.fetches: list[str] = []
        self.priorities: list[int] = []

    async def fetch(self, addr: str, chunk: str, size: int, priority: int = DEFAULT) -> bytes:
        await asyncio.sleep(0)
        self.fetches.append(addr)
        self.priorities.append(priority)
        kind = self.behaviour.get(addr, "ok")
        if kind == "ok":
            return self.chunks[chunk]
        if kind == "corrupt":
            return bytes(size)
        raise ParentError(kind, f"{addr} is {kind}")


class Stream:
    def __init__(self, data: bytes, clock: Clock, gate: asyncio.Event | None,
                 tick: float) -> None:
        self.data, self.clock, self.gate, self.tick = data, clock, gate, tick
        self.at = 0

    async def read(self, n: int = -1) -> bytes:
        if self.at and self.gate is not None:
            await self.gate.wait()  # after the first part: held until the test lets it go
        self.clock.t += self.tick
        part = self.data[self.at:self.at + (n if n >= 0 else len(self.data))]
        self.at += len(part)
        await asyncio.sleep(0)
        return part


class Origin:
    """The OriginSource seam: serves `data`; the next `fail` requests answer 503."""

    def __init__(self, data: bytes, clock: Clock) -> None:
        self.data, self.clock = data, clock
        self.requests: list[tuple[int, int]] = []
        self.asked_at: list[float] = []  # clock time of each request
        self.fail = 0
        self.gate: asyncio.Event | None = None
        self.tick = 0.0  # clock seconds per read

    @contextlib.asynccontextmanager
    async def open_range(self, req: OriginRequest, start: int, end: int,
                         priority: int = DEFAULT) -> AsyncIterator[Stream]:
        self.requests.append((start, end))
        self.asked_at.append(self.clock.t)
        if self.fail:
            self.fail -= 1
            raise OriginError("origin answered 503", 503)
        yield Stream(self.data[start:end + 1], self.clock, self.gate, self.tick)


class Store(ChunkStore):
    """The real store; free space as the test says, and writes that fail on demand."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.space = (100 << 30, 200 << 30)
        self.full = False
        self.puts = 0

    def free_space(self) -> tuple[int, int] | None:
        return self.space

    async def put_piece(self, task_id: str, index: int, chunk: str,
                        data: bytes | memoryview, verify: bool = False) -> None:
        self.puts += 1
        if self.full:
            raise CannotStore("No space left on device", full=True)
        await super().put_piece(task_id, index, chunk, data, verify)


@dataclass
class World:
    blob: Blob
    clock: Clock
    scheduler: Scheduler
    parents: Parents
    origin: Origin
    store: Store
    metrics: PeerMetrics
    engine: Engine

    async def open(self) -> TaskRun:
        return await self.engine.open(self.blob.digest, len(self.blob.data), self.blob.digest,
                                      REQ)

    async def read(self, run: TaskRun | None = None, priority: int = DEFAULT,
                   rng: ByteRange | None = None, expect: str | None = "digest") -> bytes:
        run = run or await self.open()
        rng = rng or ByteRange(0, len(self.blob.data) - 1)
        got = bytearray()
        async with contextlib.aclosing(self.engine.read(
                run, rng, self.blob.digest if expect == "digest" else expect,
                priority)) as views:
            async for view in views:
                got += view
        return bytes(got)

    def downloaded(self, source: str) -> float:
        value = self.metrics.registry.get_sample_value("naiad_peer_download_bytes_total",
                                                       {"source": source})
        return value or 0.0

    def verify_failures(self) -> float:
        return self.metrics.registry.get_sample_value("naiad_peer_verify_failures_total") or 0


def from_parents(blob: Blob, *refs: ParentRef) -> Policy:
    return lambda p, exclude, n: Decision(piece=p, action="parents", chunk=blob.chunk(p),
                                          parents=[r for r in refs if r.id not in exclude])


def lease(blob: Blob, epoch: Callable[[int], int] = lambda n: 1) -> Policy:
    last = blob.layout.count - 1
    return lambda p, exclude, n: Decision(piece=p, action="source", epoch=epoch(n), first=0,
                                          last=last, reason="no-holder")


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = make_world(tmp_path, 4 * PIECE + 1000)
    yield w
    await w.engine.close()
    w.store.close()


def make_world(tmp_path: Path, size: int, **engine: object) -> World:
    blob = Blob(random.Random(size).randbytes(size))
    clock = Clock()
    store = Store(tmp_path / "store")
    store.open()
    scheduler = Scheduler(clock, from_parents(blob, A))
    parents, origin, metrics = Parents(blob), Origin(blob.data, clock), PeerMetrics()
    eng = Engine(peer_id="me", store=store, scheduler=scheduler, origin=origin,
                 parents=parents, metrics=metrics, piece_size=PIECE, prefetch=False,
                 clock=clock, rng=random.Random(1), **engine)  # type: ignore[arg-type]
    return World(blob, clock, scheduler, parents, origin, store, metrics, eng)


# -- tasks -----------------------------------------------------------------------------------

async def test_concurrent_opens_of_a_task_share_one_layout_question(world: World) -> None:
    mine, again = await asyncio.gather(world.open(), world.open())
    assert world.scheduler.ensured == 1
    assert mine is again and not mine.direct
    assert await world.read(mine, rng=ByteRange(0, PIECE - 1)) == world.blob.piece(0)
    other = OriginRequest(url="https://other.test/v2/r/blobs/x", registry="https://other.test")
    blob = world.blob
    theirs = await world.engine.open(blob.digest, len(blob.data), blob.digest, other)
    assert theirs.direct, "another registry's client reads its own registry until proven"
    assert mine.origin == REQ
    await world.read(mine)  # the whole blob, hashed here: proven
    assert mine.meta.sealed
    assert await world.engine.open(blob.digest, len(blob.data), blob.digest, other) is mine


# -- parents ---------------------------------------------------------------------------------

async def test_a_good_parent_serves_every_piece_verified_stored_and_announced(
        world: World) -> None:
    run = await world.open()
    plan = await world.engine.plan(run, ByteRange(0, len(world.blob.data) - 1))
    assert (plan.source, plan.origin_reasons) == ("peer", ())
    assert await world.read(run) == world.blob.data
    count = world.blob.layout.count
    assert world.scheduler.announced == {i: world.blob.chunk(i) for i in range(count)}
    assert world.store.pieces(run.task_id) == world.scheduler.announced
    assert world.origin.requests == []
    assert world.downloaded("peer") == len(world.blob.data)
    # copies from a peer: their claims may wait longer for a schedule call to carry them
    assert set(world.scheduler.sources.values()) == {"peer"}


async def test_two_readers_of_a_piece_share_one_fetch(world: World) -> None:
    run = await world.open()
    first, second = await asyncio.gather(world.read(run), world.read(run))
    assert first == second == world.blob.data
    assert len(world.parents.fetches) == world.blob.layout.count
    assert len(world.scheduler.calls) == 1, "the workers' questions went in one batch"


async def test_a_corrupt_parent_is_reported_excluded_and_the_next_one_serves(
        world: World) -> None:
    world.scheduler.policy = from_parents(world.blob, A, B)
    world.parents.behaviour[A.addr] = "corrupt"
    assert await world.read() == world.blob.data
    count = world.blob.layout.count
    assert sorted(world.scheduler.reports) == [("a", i, "corrupt") for i in range(count)]
    assert world.verify_failures() == count
    assert world.parents.fetches.count(B.addr) == count


async def test_a_corrupt_only_parent_is_excluded_in_the_next_round(world: World) -> None:
    refs = {1: A, 2: B}
    world.scheduler.policy = lambda p, exclude, n: Decision(
        piece=p, action="parents", chunk=world.blob.chunk(p), parents=[refs.get(n, C)])
    world.parents.behaviour[A.addr] = "corrupt"
    world.parents.behaviour[B.addr] = "corrupt"
    assert await world.read() == world.blob.data
    # Each round excludes the parents found corrupt before it. (A round's pieces may be asked
    # in more than one call: each is found corrupt as the store's writer hashes it.)
    excludes = [exclude for _, exclude, _ in world.scheduler.calls]
    assert [e for k, e in enumerate(excludes) if e not in excludes[:k]] == \
        [set(), {"a"}, {"a", "b"}]
    assert excludes == sorted(excludes, key=len)


async def test_parents_that_keep_failing_send_the_piece_to_the_origin_after_three_rounds(
        world: World) -> None:
    blob = world.blob
    world.scheduler.policy = lambda p, exclude, n: Decision(
        piece=p, action="parents", chunk=blob.chunk(p), parents=[A])
    world.parents.behaviour[A.addr] = "failed"
    assert await world.read() == blob.data
    assert sorted(world.scheduler.reports) == [("a", i, "failed") for i in range(blob.layout.count)
                                       for _ in range(3)]
    assert len(world.scheduler.calls) == 3, "three rounds, the pieces asked together"
    assert len(world.origin.requests) == blob.layout.count, "each piece alone"


async def test_a_stalled_parent_is_reported_slow_and_the_next_one_serves(
        world: World) -> None:
    world.scheduler.policy = from_parents(world.blob, A, B)
    world.parents.behaviour[A.addr] = "slow"
    assert await world.read() == world.blob.data
    assert {kind for _, _, kind in world.scheduler.reports} == {"slow"}
    assert world.origin.requests == []


async def test_busy_parents_are_asked_again_then_after_the_patience_the_origin(
        tmp_path: Path) -> None:
    w = make_world(tmp_path, PIECE)
    try:
        w.parents.behaviour[A.addr] = "busy"
        run = await w.open()
        started = w.clock.t
        assert await w.read(run) == w.blob.data
        assert w.clock.t - started == pytest.approx(BUSY_PATIENCE, abs=0.2)
        assert len(w.scheduler.calls) > 100, "backed off ~50 ms at a time, asking each time"
        assert w.scheduler.reports == [], "busy is no one's fault"
        assert w.origin.requests == [(0, PIECE - 1)]
    finally:
        await w.engine.close()
        w.store.close()


# -- the origin under leases -------------------------------------------------------------------

async def test_a_lease_fetches_its_whole_run_in_one_origin_request_with_progress(
        world: World) -> None:
    world.scheduler.policy = lease(world.blob)
    world.origin.tick = 0.2  # each read takes a while: the lease is kept alive
    run = await world.open()
    plan = await world.engine.plan(run, ByteRange(0, len(world.blob.data) - 1))
    assert (plan.source, plan.origin_reasons) == ("origin", ("no-holder",))
    assert await world.read(run) == world.blob.data
    assert world.origin.requests == [(0, len(world.blob.data) - 1)]
    assert world.scheduler.progressed and set(world.scheduler.progressed) == {1}
    assert len(world.scheduler.announced) == world.blob.layout.count
    assert world.downloaded("origin") == len(world.blob.data)
    assert set(world.scheduler.sources.values()) == {"origin"}  # first copies: told at once


async def test_a_failed_run_is_asked_for_again_and_taken_over_under_a_new_epoch(
        world: World) -> None:
    world.scheduler.policy = lease(world.blob, epoch=lambda n: n)
    world.origin.fail = 1
    assert await world.read() == world.blob.data
    assert len(world.origin.requests) == 2
    assert world.scheduler.calls[1][0] == list(range(world.blob.layout.count))


async def test_a_run_whose_scheduler_stopped_answering_stops_and_the_rest_is_asked_again(
        world: World) -> None:
    """The scheduler hears nothing of the run's progress (a partition, an outage): after
    LEASE_LAPSE its lease has been handed on, so the run stops between pieces instead of
    fetching what the next holder fetches too; the rest comes under the next lease, no
    byte fetched twice, and the lapse is not counted as an origin failure."""
    world.scheduler.policy = lease(world.blob, epoch=lambda n: n)
    world.scheduler.silent = True
    world.origin.tick = 0.9  # one read per piece: pieces 0-2 are read before 2 s pass
    assert await world.read() == world.blob.data
    size = len(world.blob.data)
    assert world.origin.requests == [(0, size - 1), (3 * PIECE, size - 1)]
    assert world.downloaded("origin") == size
    assert world.scheduler.calls[1][0] == [3, 4]


async def test_a_lease_that_keeps_failing_makes_the_piece_unavailable(world: World) -> None:
    world.scheduler.policy = lease(world.blob, epoch=lambda n: n)
    world.origin.fail = 1000
    with pytest.raises(PieceUnavailable, match="503"):
        await world.read()
    assert len(world.origin.requests) == ORIGIN_ATTEMPTS, "the pieces' runs were shared"


async def test_a_piece_waits_for_another_peers_lease_until_it_lapses_and_is_taken_over(
        world: World) -> None:
    blob = world.blob

    def policy(p: int, exclude: set[str], n: int) -> Decision:
        if n < 3:
            return Decision(piece=p, action="wait", reason="lease-held")
        return Decision(piece=p, action="source", epoch=2, first=0,
                        last=blob.layout.count - 1, reason="lease-lapsed")

    world.scheduler.policy = policy
    run = await world.open()
    plan = await world.engine.plan(run, ByteRange(0, len(blob.data) - 1))
    assert plan.origin_reasons == ("lease-lapsed",)
    assert await world.read(run) == blob.data
    assert [pieces for pieces, _, _ in world.scheduler.calls[:3]] == [[0]] * 3
    assert {wait for _, _, wait in world.scheduler.calls} == {2000}, "long polls"
    assert world.origin.requests == [(0, len(blob.data) - 1)]


async def test_an_on_demand_read_stops_waiting_for_a_lease_holder_after_on_demand_wait(
        world: World) -> None:
    world.scheduler.policy = lambda p, exclude, n: Decision(piece=p, action="wait",
                                                            reason="lease-held")
    run = await world.open()
    started = world.clock.t
    plan = await world.engine.plan(run, ByteRange(0, PIECE - 1), ON_DEMAND)
    assert plan.origin_reasons == ("on-demand-wait",)
    assert await world.read(run, ON_DEMAND, ByteRange(0, PIECE - 1), None) \
        == world.blob.piece(0)
    assert world.clock.t - started == pytest.approx(ON_DEMAND_WAIT)
    assert world.scheduler.calls[0][2] == int(ON_DEMAND_WAIT * 1000)
    assert (0, PIECE - 1) in world.origin.requests, "its piece alone, no lease"


async def test_busy_holders_are_waited_for_even_on_demand(world: World) -> None:
    blob = world.blob

    def policy(p: int, exclude: set[str], n: int) -> Decision:
        if n < 4:
            return Decision(piece=p, action="wait", reason="holders-busy")
        return Decision(piece=p, action="parents", chunk=blob.chunk(p), parents=[A])

    world.scheduler.policy = policy
    rng = ByteRange(0, PIECE - 1)
    assert await world.read(None, ON_DEMAND, rng, None) == blob.piece(0)
    assert world.origin.requests == []
    assert world.parents.priorities == [ON_DEMAND], "the parent is told it is urgent"


# -- no scheduler ------------------------------------------------------------------------------

async def test_scheduler_down_serves_from_the_holders_last_learnt_without_blame(
        world: World) -> None:
    run = await world.open()
    assert await world.read(run) == world.blob.data
    world.engine.drop_chunk(world.blob.chunk(1))  # rot found: fetched again, but how?
    world.scheduler.down = True
    fetched = len(world.parents.fetches)
    assert await world.read(run) == world.blob.data
    assert world.parents.fetches[fetched:] == [A.addr]
    assert world.origin.requests == []
    # Tried once: the holders learnt are forgotten, the next time it is the origin.
    world.engine.drop_chunk(world.blob.chunk(1))
    plan = await world.engine.plan(run, ByteRange(*world.blob.layout.span(1)))
    assert plan.origin_reasons == ("scheduler-unreachable",)
    assert await world.read(run) == world.blob.data
    assert world.scheduler.reports == []


async def test_a_short_outage_is_waited_out_and_the_piece_comes_from_parents(
        world: World) -> None:
    world.scheduler.down = world.scheduler.lost_recently = True
    world.scheduler.back_at = world.clock.t + 3.0
    run = await world.open()
    assert await world.read(run) == world.blob.data
    assert world.origin.requests == [], "a short outage costs no origin piece"
    assert world.parents.fetches


async def test_a_long_outage_sends_a_waiting_reader_to_the_origin_after_outage_stall(
        world: World) -> None:
    world.scheduler.down = world.scheduler.lost_recently = True
    run = await world.open()
    started = world.clock.t
    assert await world.read(run) == world.blob.data
    # The piece the reader waited for went to the origin alone once it had waited
    # OUTAGE_STALL, not the read-ahead window with it (the clock races ahead meanwhile: it
    # jumps while the store's threads work, so only when each piece was asked for counts).
    assert world.origin.requests[0] == (0, PIECE - 1)
    assert world.origin.asked_at[0] - started == pytest.approx(OUTAGE_STALL, abs=0.3)
    assert all(t >= world.origin.asked_at[0] for t in world.origin.asked_at)
    assert world.parents.fetches == []
    assert len(world.origin.requests) == world.blob.layout.count, "each piece alone"


async def test_a_scheduler_never_reached_sends_every_piece_to_the_origin_at_once(
        world: World) -> None:
    world.scheduler.down = True
    run = await world.open()
    assert run.meta.piece_size == PIECE
    started = world.clock.t
    plan = await world.engine.plan(run, ByteRange(0, len(world.blob.data) - 1))
    assert plan.origin_reasons == ("scheduler-unreachable",)
    assert await world.read(run) == world.blob.data
    assert world.clock.t == started


# -- the disk --------------------------------------------------------------------------------

async def test_a_full_disk_passes_bytes_through_uncached_and_retries_after_the_backoff(
        world: World) -> None:
    world.store.full = True
    run = await world.open()
    assert await world.read(run) == world.blob.data
    assert world.scheduler.announced == {}, "nobody is told it is here"
    assert world.store.pieces(run.task_id) == {}
    assert world.store.puts == 1, "no more writes tried within the backoff"
    world.store.full = False
    assert await world.read(run) == world.blob.data
    assert world.store.puts == 1
    world.clock.t += FULL_BACKOFF
    assert await world.read(run) == world.blob.data
    assert len(world.store.pieces(run.task_id)) == world.blob.layout.count


async def test_below_the_free_space_floor_nothing_is_cached(world: World) -> None:
    world.store.space = (1 << 20, 1 << 30)  # 1 MiB free, 50 MiB kept free
    run = await world.open()
    assert await world.read(run) == world.blob.data
    assert world.store.puts == 0
    assert world.scheduler.announced == {}


async def test_a_quota_evicts_the_least_recently_used_task_not_the_one_being_read(
        tmp_path: Path) -> None:
    w = make_world(tmp_path, 4 * PIECE, disk_quota=6 * PIECE)
    try:
        first = await w.open()
        assert await w.read(first) == w.blob.data
        other = Blob(os.urandom(4 * PIECE))
        w.parents.chunks.update(other.by_chunk())
        w.scheduler.policy = lambda p, exclude, n: Decision(
            piece=p, action="parents", chunk=other.chunk(p), parents=[A])
        w.clock.t += OPEN_HOLD  # long since opened: nobody is about to read it
        second = await w.engine.open(other.digest, 4 * PIECE, other.digest, REQ)
        got = bytearray()
        async for view in w.engine.read(second, ByteRange(0, 4 * PIECE - 1), other.digest):
            got += view
        assert bytes(got) == other.data
        assert first.task_id not in w.engine.runs, "evicted"
        assert w.store.pieces(first.task_id) == {}
        assert len(w.store.pieces(second.task_id)) == 4
        assert None in w.scheduler.withdrawn
    finally:
        await w.engine.close()
        w.store.close()


async def test_a_task_just_opened_is_not_evicted_before_its_read_begins(tmp_path: Path) -> None:
    """Between a client's open and its first read the task is not yet being read: evicting it
    then left the reader with pieces whose files were gone ("kept failing" in the soak)."""
    w = make_world(tmp_path, 4 * PIECE, disk_quota=6 * PIECE)
    try:
        first = await w.open()
        assert await w.read(first) == w.blob.data
        w.clock.t += OPEN_HOLD
        reopened = await w.open()  # a new client, about to read it
        other = Blob(os.urandom(4 * PIECE))
        w.parents.chunks.update(other.by_chunk())
        w.scheduler.policy = lambda p, exclude, n: Decision(
            piece=p, action="parents", chunk=other.chunk(p), parents=[A])
        second = await w.engine.open(other.digest, 4 * PIECE, other.digest, REQ)
        got = bytearray()
        async for view in w.engine.read(second, ByteRange(0, 4 * PIECE - 1), other.digest):
            got += view
        assert bytes(got) == other.data
        assert w.engine.runs.get(first.task_id) is reopened, "kept for its reader"
        assert len(w.store.pieces(first.task_id)) == 4, "its files are still there"
        assert await w.read(reopened) == w.blob.data
    finally:
        await w.engine.close()
        w.store.close()


# -- readers ---------------------------------------------------------------------------------

async def test_a_reader_cancelled_halfway_leaves_the_task_to_be_fetched_and_sealed(
        world: World) -> None:
    world.scheduler.policy = lease(world.blob)
    world.origin.gate = asyncio.Event()
    run = await world.open()
    views = world.engine.read(run, ByteRange(0, len(world.blob.data) - 1), world.blob.digest)
    first = await anext(views)
    assert bytes(first) == world.blob.piece(0)
    assert run.readers == 1 and run.hashing == 1
    await views.aclose()  # the client went away
    assert run.readers == 0 and run.hashing == 0
    assert run.inflight, "the fetch goes on for the next reader"
    world.origin.gate.set()
    await asyncio.wait_for(world.scheduler.sealed_now.wait(), 5)
    assert run.meta.sealed and run.complete
    assert world.origin.requests == [(0, len(world.blob.data) - 1)]


async def test_a_whole_blob_that_fails_its_digest_withholds_its_last_piece(
        world: World) -> None:
    world.scheduler.policy = lease(world.blob)
    wrong = bytearray(world.blob.data)
    wrong[-1] ^= 1
    world.origin.data = bytes(wrong)
    run = await world.open()
    got = bytearray()
    with pytest.raises(BlobCorrupt):
        async for view in world.engine.read(run, ByteRange(0, len(wrong) - 1),
                                            world.blob.digest):
            got += view
    last_start = world.blob.layout.span(world.blob.layout.count - 1)[0]
    assert bytes(got) == bytes(wrong[:last_start]), "all but the last piece went out"
    assert world.scheduler.mismatches == 1
    assert run.have == {} and world.store.pieces(run.task_id) == {}
    assert not run.meta.sealed


async def test_a_rotten_stored_chunk_is_dropped_withdrawn_and_fetched_again(
        world: World) -> None:
    run = await world.open()
    assert await world.read(run) == world.blob.data
    path = world.store.chunk_path(world.blob.chunk(2))
    path.chmod(0o644)
    path.write_bytes(bytes(path.stat().st_size))
    assert await world.read(run) == world.blob.data
    assert [2] in world.scheduler.withdrawn
    assert world.verify_failures() == 1
