"""The download engine: obtains a task's pieces from parents or the origin, verified, stored and
announced, and streams byte ranges of it to readers.

How a piece is obtained (one worker per missing piece, shared by every reader: in-peer single
flight):

1. Ask the scheduler (requests of a task's workers are batched into one call; pieces that must
   wait for a lease holder long-poll until a holder appears or the lease lapses).
2. `parents`: fetch the chunk from the ranked parents in turn, verify its blake3 before anything
   else sees it; a corrupt, failed or stalled parent is reported and excluded, and the
   scheduler asked again. After a few rounds, fetch from the origin (`parents-failed`).
3. `source`: this peer holds the origin lease for a run of consecutive pieces: one ranged origin
   request covers the whole run; each piece is hashed, stored and announced as it arrives, and
   the lease is kept alive by progress reports.
4. No scheduler: the holders last learnt for the piece; else wait for a scheduler lost moments
   ago, but not past the point where a reader has waited OUTAGE_STALL for the piece (then the
   origin, for that piece alone) or the outage has lasted OUTAGE_PATIENCE (then the origin for
   all): a short outage or partition costs one origin piece per stalled reader, not the
   read-ahead window, and never a stall much past OUTAGE_STALL.

Readers walk the pieces covering their range in order with a bounded read-ahead, so the first
byte goes out before the last piece is fetched and memory stays flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import ids
from common.limits import BACKGROUND, DEFAULT, ON_DEMAND, PrioritySlots
from common.metrics import PeerMetrics
from common.models import Decision, ParentRef, TaskMeta, TaskRequest
from common.pieces import MiB, PieceLayout, default_piece_size
from common.ranges import ByteRange
from common.tasks import Activity, TaskSet, consume_exception
from peer.origin import OriginClient, OriginError, OriginRequest
from peer.parents import ParentClient, ParentError
from peer.scheduler_client import SchedulerClient, SchedulerRefused, SchedulerUnavailable
from peer.store import CannotStore, ChunkCorrupt, ChunkStore

log = logging.getLogger("naiad.peer.engine")

READAHEAD_BYTES = 16 * MiB
LOCAL_AHEAD_BYTES = 4 * MiB  # stored pieces read ahead of a reader
LONG_POLL_MS = 2000
ON_DEMAND_WAIT = 1.0  # DESIGN: an on-demand read waits ~1 s for a lease holder
PREFETCH_PIECES = 4  # background prefetch: pieces in flight per task
# A scheduler lost moments ago is waited for (see `outage_wait`): at most this long while a
# reader waits for the piece (on-demand reads: the second figure), else this long.
OUTAGE_STALL, ON_DEMAND_STALL = 5.0, 1.0
OUTAGE_PATIENCE = 15.0
OUTAGE_POLL = 0.25  # how often a piece waiting out an outage looks at its readers again
PREFETCH_TASKS = 2  # tasks prefetched at once
PARENT_FETCHES = 32  # concurrent piece fetches from parents, all tasks
QUOTA_HIGH, QUOTA_LOW = 0.95, 0.85  # --disk-quota watermarks: evict above high, down to low
# Free space kept on the store's filesystem, quota or not, so the index can always be written
# (and evictions recorded): this share of it, at most FREE_FLOOR_MAX. Below it nothing is
# cached; eviction frees twice that.
FREE_FLOOR_SHARE, FREE_FLOOR_MAX = 0.05, 1 << 30
FULL_BACKOFF = 5  # seconds without caching after a write of the store failed
PARENT_ROUNDS = 3
# Parents all busy: retry every ~BUSY_BACKOFF, for up to this long, before the origin.
BUSY_BACKOFF = 0.05
BUSY_PATIENCE, BUSY_PATIENCE_ON_DEMAND = 10.0, 1.0
ORIGIN_ATTEMPTS = 3
PROGRESS_EVERY = 0.5
PLAN_WAIT = 2.0
STORE_AHEAD = 4
_READ_SIZE = 256 << 10


def outage_wait(now: float, since: float, blocked_since: float | None, on_demand: bool) -> float:
    """How much longer a piece that has had no decision since `since` should wait for a
    scheduler lost moments ago before going to the origin (<= 0: go now). `blocked_since`: when
    a reader began waiting for the piece, if one is."""
    wait = since + OUTAGE_PATIENCE - now
    if blocked_since is not None:
        wait = min(wait, blocked_since + (ON_DEMAND_STALL if on_demand else OUTAGE_STALL) - now)
    return wait


class PieceUnavailable(Exception):
    """A piece could be obtained from neither parents nor the origin."""


class BlobCorrupt(Exception):
    """The assembled blob does not match its digest."""


class LengthConflict(OriginError):
    """The origin gives a blob this peer verified against its digest another length."""


class _Sha256:
    """A whole-blob sha256 computed beside the stream: each update runs in a worker thread
    (hashlib releases the GIL), in order, at most one piece behind the stream."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pending: asyncio.Task[None] | None = None

    async def update(self, data: bytes) -> None:
        if self._pending is not None:
            await self._pending
        self._pending = asyncio.create_task(asyncio.to_thread(self._hash.update, data))
        self._pending.add_done_callback(consume_exception)

    async def digest(self) -> str:
        if self._pending is not None:
            await self._pending
            self._pending = None
        return ids.SHA256_PREFIX + self._hash.hexdigest()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


@dataclass
class OriginRun:
    """One ranged origin request covering pieces first..last."""

    first: int
    last: int
    pieces: dict[int, asyncio.Future[bytes]]
    failed: bool = False


@dataclass
class TaskRun:
    """What the engine knows about one task while this process runs.

    `origin`: the registry the run fetches from (and announces its pieces as coming from),
    with the latest credentials one of its clients gave. `direct`: a read for a client of
    another registry while this peer has not proven the blob: straight from that registry,
    neither stored nor shared."""

    meta: TaskMeta
    origin: OriginRequest
    have: dict[int, str]
    direct: bool = False
    indexed: bool = False  # the store's index holds the task with this layout
    inflight: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    decided: dict[int, asyncio.Future[tuple[str, str | None]]] = field(default_factory=dict)
    known: dict[int, tuple[str, list[ParentRef]]] = field(default_factory=dict)
    origin_runs: dict[int, OriginRun] = field(default_factory=dict)
    batcher: DecisionBatcher | None = None
    priority: dict[int, int] = field(default_factory=dict)  # of pieces in flight
    sealing: bool = False
    prefetching: bool = False
    readers: int = 0
    hashing: int = 0  # whole-blob readers hashing as they go: one of them seals the task
    awaited: dict[int, list[float]] = field(default_factory=dict)  # piece -> readers' waits

    @contextlib.contextmanager
    def awaiting(self, index: int) -> Iterator[None]:
        """A reader waits for piece `index` meanwhile (outage_wait reads since when)."""
        starts = self.awaited.setdefault(index, [])
        mine = time.monotonic()
        starts.append(mine)
        try:
            yield
        finally:
            starts.remove(mine)
            if not starts:
                del self.awaited[index]

    def awaited_since(self, index: int) -> float | None:
        starts = self.awaited.get(index)
        return starts[0] if starts else None

    @property
    def busy(self) -> bool:
        """Being read or fetched: its chunks must not be evicted."""
        return bool(self.readers or self.inflight or self.prefetching)

    @property
    def task_id(self) -> str:
        return self.meta.task_id

    @property
    def layout(self) -> PieceLayout:
        return PieceLayout(self.meta.length, self.meta.piece_size)

    @property
    def complete(self) -> bool:
        return len(self.have) >= self.layout.count


@dataclass(frozen=True)
class Plan:
    """Where the bytes of a read are expected to come from, when its headers go out."""

    source: str  # local, peer, origin or mixed
    origin_reasons: tuple[str, ...]


class DecisionBatcher:
    """Coalesces the decision requests of a task's piece workers into schedule calls.

    Pieces asked for in the same loop iteration travel in one call; a piece told to wait goes
    back into the next call, which long-polls while every piece in it must wait. An on-demand
    piece (priority 6) that has waited ON_DEMAND_WAIT for a lease holder is answered with a
    direct origin fetch of its own, so a container's read is never stuck behind a slow holder.
    """

    def __init__(self, client: SchedulerClient, task_id: str, tasks: TaskSet,
                 priority_of: Callable[[int], int], registry: Callable[[], str]) -> None:
        self.client = client
        self.task_id = task_id
        self.tasks = tasks
        self.priority_of = priority_of
        self.registry = registry
        self._unsent: dict[int, _Ask] = {}
        self._flush_scheduled = False

    def decide(self, index: int, exclude: frozenset[str]) -> asyncio.Future[Decision]:
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(consume_exception)
        self._unsent[index] = _Ask(fut, exclude, time.monotonic())
        self._schedule_flush()
        return fut

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = {i: ask for i, ask in self._unsent.items() if not ask.fut.done()}
        self._unsent = {}
        if batch:
            self.tasks.spawn(self._call(batch), f"schedule-{self.task_id[:19]}")

    async def _call(self, batch: dict[int, _Ask]) -> None:
        exclude: set[str] = set()
        for ask in batch.values():
            exclude |= ask.exclude
        urgent = any(self.priority_of(i) >= ON_DEMAND for i in batch)
        try:
            decisions = await self.client.schedule(
                self.task_id, list(batch), exclude,
                int(ON_DEMAND_WAIT * 1000) if urgent else LONG_POLL_MS, self.registry())
        except (SchedulerUnavailable, SchedulerRefused) as e:
            for ask in batch.values():
                if not ask.fut.done():
                    ask.fut.set_exception(e)
            return
        now = time.monotonic()
        for d in decisions:
            ask = batch.pop(d.piece, None)
            if ask is None or ask.fut.done():
                continue
            if d.action != "wait":
                ask.fut.set_result(d)
            elif self.priority_of(d.piece) >= ON_DEMAND and now - ask.since >= ON_DEMAND_WAIT \
                    and d.reason != "holders-busy":  # holders exist: never worth the origin
                ask.fut.set_result(Decision(piece=d.piece, action="source",
                                            reason="on-demand-wait"))
            else:
                self._unsent[d.piece] = ask
                self._schedule_flush()
        for ask in batch.values():
            if not ask.fut.done():
                ask.fut.set_exception(SchedulerUnavailable("scheduler gave no decision"))


@dataclass
class _Ask:
    fut: asyncio.Future[Decision]
    exclude: frozenset[str]
    since: float


class Engine:
    def __init__(self, *, peer_id: str, store: ChunkStore, scheduler: SchedulerClient,
                 origin: OriginClient, parents: ParentClient, metrics: PeerMetrics,
                 verify_on_serve: bool = True, piece_size: int | None = None,
                 prefetch: bool = True, disk_quota: int | None = None) -> None:
        self.peer_id = peer_id
        self.store = store
        self.scheduler = scheduler
        self.origin = origin
        self.parents = parents
        self.metrics = metrics
        self.verify_on_serve = verify_on_serve
        self.piece_size = piece_size
        self.prefetch_enabled = prefetch
        self.disk_quota = disk_quota
        self._store_full_until = 0.0  # no write of the store is tried before this
        self._caching = store.read_only is None  # false from a failed write to the next success
        store.stamping = not verify_on_serve  # unverified reads only of untouched files
        self._writing = 0  # bytes of chunk writes under way: counted against the quota
        self.fetch_slots = PrioritySlots(PARENT_FETCHES)
        self._prefetch_slots = asyncio.Semaphore(PREFETCH_TASKS)
        self.runs: dict[str, TaskRun] = {}
        self.activity = Activity()  # pieces being fetched or tasks being read
        self._opening: dict[str, asyncio.Future[TaskRun]] = {}
        self.tasks = TaskSet("engine")

    async def close(self) -> None:
        await self.tasks.close()

    # -- tasks -----------------------------------------------------------------------------

    async def open(self, task_id: str, length: int, digest: str | None,
                   origin: OriginRequest) -> TaskRun:
        """The run for a task, learning its piece layout from the store, else the scheduler,
        else (no scheduler) the default every peer computes alike."""
        run = self.runs.get(task_id)
        if run is not None and run.meta.length == length:
            return self._for_client(run, origin)
        pending = self._opening.get(task_id)
        if pending is not None:
            return self._for_client(await asyncio.shield(pending), origin)
        fut: asyncio.Future[TaskRun] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(consume_exception)
        self._opening[task_id] = fut
        try:
            run = await self._open(task_id, length, digest, origin)
            fut.set_result(run)
            return run
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            del self._opening[task_id]

    def _for_client(self, run: TaskRun, origin: OriginRequest) -> TaskRun:
        """The run a client of `origin.registry` reads. A client of the run's own registry
        refreshes its credentials (the newest token is the likeliest to work); a client of
        another registry never changes where the run fetches from. Bytes fetched from one
        registry reach another's clients only once this peer has proven the blob's sha256:
        until then such a client reads its own registry directly."""
        if origin.registry == run.origin.registry:
            run.origin = origin
            return run
        if run.meta.sealed:
            return run
        if not run.have and not run.busy:  # nothing here from the other registry: rebind
            run.origin = origin
            return run
        return TaskRun(meta=run.meta, origin=origin, have={}, direct=True)

    async def _open(self, task_id: str, length: int, digest: str | None,
                    origin: OriginRequest) -> TaskRun:
        meta = self.store.task(task_id)
        indexed = meta is not None
        if meta is not None and meta.length != length:
            if meta.sealed:
                # Its digest fixes the content, and this copy matched it: the origin is wrong.
                raise LengthConflict(f"{task_id} is {meta.length} bytes (verified here), "
                                     f"but {origin.registry} says {length}")
            log.warning("task %s changed length (%d, now %d): dropping the local copy",
                        task_id, meta.length, length)
            try:
                self.store.drop_task(task_id)
            except CannotStore as e:  # the old row stays: nothing is stored under it
                self._cannot_cache(e)
            self.scheduler.withdraw(task_id, None)
            meta = None
        if meta is None:
            request = TaskRequest(task_id=task_id, length=length, piece_size=self.piece_size,
                                  digest=digest)
            try:
                # The scheduler's `sealed` is advice: proven here only once hashed here.
                meta = (await self.scheduler.ensure_task(request)).model_copy(
                    update={"sealed": False})
            except (SchedulerUnavailable, SchedulerRefused) as e:
                log.info("task %s without the scheduler: %s", task_id, e)
                meta = TaskMeta(task_id=task_id, length=length,
                                piece_size=self.piece_size or default_piece_size(length),
                                digest=digest)
            indexed = self._index_task(meta)
        run = TaskRun(meta=meta, origin=origin, indexed=indexed,
                      have=self.store.pieces(task_id) if indexed else {})
        run.batcher = DecisionBatcher(self.scheduler, task_id, self.tasks,
                                      lambda i: run.priority.get(i, DEFAULT),
                                      lambda: run.origin.registry)
        self.runs[task_id] = run
        return run

    # -- pieces ----------------------------------------------------------------------------

    def _ensure(self, run: TaskRun, index: int,
                priority: int = DEFAULT) -> asyncio.Future[bytes] | None:
        """Start obtaining a piece unless it is stored or already on its way; a more urgent
        reader raises the priority of a piece already on its way."""
        if index in run.have:
            return None
        fut = run.inflight.get(index)
        if fut is not None:
            run.priority[index] = max(priority, run.priority.get(index, 0))
        else:
            run.priority[index] = priority
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            fut.add_done_callback(consume_exception)
            decided: asyncio.Future[tuple[str, str | None]] = loop.create_future()
            run.inflight[index] = fut
            run.decided[index] = decided
            self.tasks.spawn(self._work(run, index, fut, decided), f"piece-{index}")
            self._update_active()
        return fut

    def _update_active(self) -> None:
        active = sum(1 for r in self.runs.values() if r.inflight)
        self.metrics.tasks_active.set(active)
        self.activity.set_busy(bool(active) or any(r.readers for r in self.runs.values()))

    async def _work(self, run: TaskRun, index: int, fut: asyncio.Future[bytes],
                    decided: asyncio.Future[tuple[str, str | None]]) -> None:
        try:
            fut.set_result(await self._obtain(run, index, decided))
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            log.warning("piece %d of %s unavailable: %r", index, run.task_id, e)
            fut.set_exception(PieceUnavailable(f"piece {index} of {run.task_id}: {e!r}"))
        finally:
            if not decided.done():
                decided.cancel()
            if run.inflight.get(index) is fut:
                del run.inflight[index]
                run.decided.pop(index, None)
                run.priority.pop(index, None)
            self._update_active()

    async def _obtain(self, run: TaskRun, index: int,
                      decided: asyncio.Future[tuple[str, str | None]]) -> bytes:
        def decide(source: str, reason: str | None = None) -> None:
            if not decided.done():
                decided.set_result((source, reason))

        exclude: set[str] = set()
        rounds = origin_failures = 0
        busy_since: float | None = None
        assert run.batcher is not None
        while True:
            asked = time.monotonic()
            try:
                d = await run.batcher.decide(index, frozenset(exclude))
            except (SchedulerUnavailable, SchedulerRefused) as e:
                log.debug("no decision for piece %d of %s: %s", index, run.task_id, e)
                known = run.known.pop(index, None)  # tried once
                if known is not None:
                    decide("peer")
                    data, _ = await self._from_parents(run, index, *known, report=False)
                    if data is not None:
                        return data
                if isinstance(e, SchedulerUnavailable) \
                        and await self._outlast_outage(run, index, asked):
                    continue
                decide("origin", "scheduler-unreachable")
                return await self._from_origin(run, None, index, index)
            if d.action == "parents":
                assert d.chunk is not None
                decide("peer")
                run.known[index] = (d.chunk, d.parents)
                data, failed = await self._from_parents(run, index, d.chunk, d.parents)
                if data is not None:
                    return data
                if not failed:
                    # Every parent was at its upload slots: that is load, not failure. Back
                    # off and ask again (maybe for other holders) rather than burn a round
                    # and go to the origin, up to a bound.
                    now = time.monotonic()
                    busy_since = busy_since or now
                    patience = BUSY_PATIENCE_ON_DEMAND \
                        if run.priority.get(index, DEFAULT) >= ON_DEMAND else BUSY_PATIENCE
                    if now - busy_since < patience:
                        await asyncio.sleep(random.uniform(0.5, 1.5) * BUSY_BACKOFF)
                        continue
                    decide("origin", "parents-busy")
                    return await self._from_origin(run, None, index, index)
                exclude |= failed
                rounds += 1
                if rounds >= PARENT_ROUNDS:
                    decide("origin", "parents-failed")
                    return await self._from_origin(run, None, index, index)
                continue
            decide("origin", d.reason)
            if d.epoch is None:  # on-demand read that waited too long for the lease holder
                return await self._from_origin(run, None, index, index)
            assert d.first is not None and d.last is not None
            try:
                return await self._from_origin(run, d.epoch, d.first, d.last, index)
            except OriginError:
                origin_failures += 1
                if origin_failures >= ORIGIN_ATTEMPTS:
                    raise

    async def _outlast_outage(self, run: TaskRun, index: int, since: float) -> bool:
        """Wait for a scheduler lost moments ago, as long as `outage_wait` allows; whether it
        came back. At once False when there is none to wait for (never reached, long gone)."""
        on_demand = run.priority.get(index, DEFAULT) >= ON_DEMAND
        while (wait := outage_wait(time.monotonic(), since, run.awaited_since(index),
                                   on_demand)) > 0:
            if await self.scheduler.wait_back(min(wait, OUTAGE_POLL)):
                return True
            if not self.scheduler.recently_lost():
                return False
        return False

    async def _from_parents(self, run: TaskRun, index: int, chunk: str,
                            parents: list[ParentRef],
                            report: bool = True) -> tuple[bytes | None, set[str]]:
        """Try the parents in order; return the verified bytes and the parents that failed."""
        _, size = run.layout.span(index)
        failed: set[str] = set()
        for parent in parents:
            if parent.id == self.peer_id:
                continue
            started = time.perf_counter()
            try:
                async with self.fetch_slots.hold(run.priority.get(index, DEFAULT)):
                    data = await self.parents.fetch(parent.addr, chunk, size)
            except ParentError as e:
                if e.kind != "busy":
                    failed.add(parent.id)
                    if report:
                        self.scheduler.report(parent.id, run.task_id, index, e.kind)
                continue
            if await _hash(data) != chunk:
                self.metrics.verify_failures.inc()
                log.warning("parent %s sent corrupt piece %d of %s", parent.id, index,
                            run.task_id)
                failed.add(parent.id)
                self.scheduler.report(parent.id, run.task_id, index, "corrupt")
                continue
            await self._keep(run, index, chunk, data, "peer")
            self.metrics.piece_seconds.labels("peer").observe(time.perf_counter() - started)
            return data, failed
        return None, failed

    async def _from_origin(self, run: TaskRun, epoch: int | None, first: int, last: int,
                           index: int | None = None) -> bytes:
        """Piece `index` (default `first`) from the origin run first..last, starting the run
        unless one for this lease is already going."""
        index = first if index is None else index
        orun = run.origin_runs.get(epoch) if epoch is not None else None
        if orun is None or orun.failed or index not in orun.pieces:
            missing = [i for i in range(first, last + 1) if i not in run.have or i == index]
            first, last = min(missing), max(missing)
            loop = asyncio.get_running_loop()
            orun = OriginRun(first, last, {i: loop.create_future()
                                           for i in range(first, last + 1)})
            for f in orun.pieces.values():
                f.add_done_callback(consume_exception)
            if epoch is not None:
                run.origin_runs[epoch] = orun
            self.tasks.spawn(self._origin_run(run, epoch, orun), f"origin-{first}-{last}")
        return await asyncio.shield(orun.pieces[index])

    async def _origin_run(self, run: TaskRun, epoch: int | None, orun: OriginRun) -> None:
        """Read pieces first..last from one ranged origin request. Storing a piece overlaps
        with reading the next (at most STORE_AHEAD pieces in memory)."""
        layout = run.layout
        start = layout.span(orun.first)[0]
        end = sum(layout.span(orun.last)) - 1
        last_progress = time.monotonic()
        storing: set[asyncio.Task[None]] = set()
        try:
            priority = max((run.priority.get(i, BACKGROUND)
                            for i in range(orun.first, orun.last + 1)), default=DEFAULT)
            async with self.origin.open_range(run.origin, start, end, priority) as stream:
                for i in range(orun.first, orun.last + 1):
                    started = time.perf_counter()
                    _, size = layout.span(i)
                    parts, got = [], 0
                    while got < size:
                        part = await stream.read(min(_READ_SIZE, size - got))
                        if not part:
                            raise OriginError(f"origin body ended inside piece {i}")
                        parts.append(part)
                        got += len(part)
                        if epoch is not None and time.monotonic() - last_progress \
                                > PROGRESS_EVERY:
                            last_progress = time.monotonic()
                            self.scheduler.progress(run.task_id, epoch)
                    data = b"".join(parts)
                    del parts
                    storing.add(asyncio.create_task(
                        self._keep_origin_piece(run, orun, i, data, started)))
                    if len(storing) >= STORE_AHEAD:
                        _, storing = await asyncio.wait(storing,
                                                        return_when=asyncio.FIRST_COMPLETED)
                if storing:
                    await asyncio.gather(*storing)
        except BaseException as e:
            for t in storing:
                t.cancel()
            orun.failed = True
            err = e if isinstance(e, OriginError) else OriginError(f"origin fetch failed: {e!r}")
            for f in orun.pieces.values():
                if not f.done():
                    f.set_exception(err)
            if isinstance(e, asyncio.CancelledError):
                raise
            log.warning("origin run %d-%d of %s failed: %r", orun.first, orun.last,
                        run.task_id, e)
        finally:
            for f in orun.pieces.values():  # a waiter is never left pending, whatever failed
                if not f.done():
                    f.set_exception(OriginError(f"origin run {orun.first}-{orun.last} of "
                                                f"{run.task_id} ended without this piece"))
            if epoch is not None and run.origin_runs.get(epoch) is orun:
                del run.origin_runs[epoch]

    async def _keep_origin_piece(self, run: TaskRun, orun: OriginRun, index: int, data: bytes,
                                 started: float) -> None:
        """Keep a piece the origin sent; its readers get the bytes whether or not that works
        (asyncio.wait in the run does not look at this task's outcome)."""
        fut = orun.pieces[index]
        try:
            chunk = await _hash(data)
            if index not in run.have:
                await self._keep(run, index, chunk, data, "origin")
                self.metrics.piece_seconds.labels("origin").observe(
                    time.perf_counter() - started)
        except Exception as e:
            log.error("piece %d of %s passed through, not kept: %r", index, run.task_id, e)
        finally:
            if not fut.done():
                fut.set_result(data)

    async def _keep(self, run: TaskRun, index: int, chunk: str, data: bytes,
                    source: str) -> None:
        """Store verified bytes, count them, announce them; seal the task when complete.

        A store that cannot take them (quota, free-space floor, a full, read-only or failing
        disk) degrades to passing the bytes through uncached: the reader still gets them,
        nobody is told this peer holds them."""
        self.metrics.download_bytes.labels(source).inc(len(data))
        if not await self._store(run, index, chunk, data):
            return
        run.have[index] = chunk
        self.scheduler.announce(run.task_id, index, chunk, run.origin.registry)
        self._maybe_seal(run)

    def _maybe_seal(self, run: TaskRun) -> None:
        """Check a complete task's digest in the background, unless a whole-blob reader is
        hashing it already (it seals as it finishes: one sha256 pass, not two)."""
        if run.complete and run.meta.digest and not run.meta.sealed and not run.sealing \
                and not run.hashing:
            run.sealing = True
            self.tasks.spawn(self._seal(run), f"seal-{run.task_id[:19]}")

    async def _store(self, run: TaskRun, index: int, chunk: str, data: bytes) -> bool:
        size = len(data)
        if not self._may_write() or not self._room_for(size):
            return False
        if not run.indexed and not self._index_task(run.meta):
            return False
        self._writing += size
        try:
            await self.store.put_piece(run.task_id, index, chunk, data)
        except CannotStore as e:
            self._cannot_cache(e)
            return False
        finally:
            self._writing -= size
        if not self._caching:
            self._caching = True
            log.info("caching again")
        self.metrics.cache_bytes.set(self.store.bytes)
        return True

    def _index_task(self, meta: TaskMeta) -> bool:
        """Record the task in the store's index; whether it holds the task with this layout."""
        if not self._may_write():
            return False
        try:
            return self.store.put_task(meta)
        except CannotStore as e:
            self._cannot_cache(e)
            return False

    def _may_write(self) -> bool:
        """Whether to try writing the store now: not within FULL_BACKOFF of a failed write
        (a store that could not be opened for writing is tried again as often)."""
        if time.monotonic() < self._store_full_until:
            return False
        if self.store.read_only is not None and not self.store.reopen():
            self._cannot_cache(CannotStore(self.store.read_only))
            return False
        return True

    def _cannot_cache(self, e: CannotStore) -> None:
        """A write of the store failed: cache nothing for FULL_BACKOFF seconds and, if for want
        of space, evict. Logged once until caching works again."""
        self._store_full_until = time.monotonic() + FULL_BACKOFF
        self._uncached(f"{'disk full' if e.full else 'cannot write the store'} ({e})")
        if e.full:
            target = self.store.bytes * 3 // 4
            floor = self._floor()
            if floor is not None:
                target = min(target, self.store.bytes - (2 * floor[1] - floor[0]))
            self._evict(target)

    def _uncached(self, why: str) -> None:
        if self._caching:
            self._caching = False
            log.warning("%s: serving uncached, trying again every %d s", why, FULL_BACKOFF)

    def _floor(self) -> tuple[int, int] | None:
        """(bytes free, bytes to keep free) on the store's filesystem; None if unknown."""
        space = self.store.free_space()
        if space is None:
            return None
        return space[0], min(FREE_FLOOR_MAX, int(FREE_FLOOR_SHARE * space[1]))

    def _room_for(self, size: int) -> bool:
        """Whether `size` more bytes may be cached: within --disk-quota and above the
        free-space floor, after evicting least recently used tasks if that makes room."""
        reserve = self._writing + size  # chunk writes under way count as stored
        quota = self.disk_quota
        if quota is not None:
            if self.store.bytes + reserve > QUOTA_HIGH * quota:
                self._evict(int(QUOTA_LOW * quota) - reserve)
            if self.store.bytes + reserve > quota:
                return False
        space = self._floor()
        if space is None or space[0] - reserve >= space[1]:
            return True
        free, floor = space
        self._evict(self.store.bytes - (2 * floor + reserve - free))
        space = self._floor()
        if space is not None and space[0] - reserve >= space[1]:
            return True
        self._uncached(f"disk full: {free} bytes free, below the {floor} kept free")
        return False

    def _evict(self, target: int) -> None:
        """Drop least recently used tasks until the store holds at most `target` bytes; never
        a task being read or fetched."""
        busy = {t for t, r in self.runs.items() if r.busy}
        try:
            dropped = self.store.evict(max(0, target), busy)
        except CannotStore as e:
            dropped = e.dropped
            self._store_full_until = time.monotonic() + FULL_BACKOFF
            self._uncached(f"cannot evict ({e})")
        for task_id in dropped:
            self.runs.pop(task_id, None)
            self.scheduler.withdraw(task_id, None)
            log.info("evicted %s", task_id)
        self.metrics.cache_bytes.set(self.store.bytes)

    # -- whole-blob verification -----------------------------------------------------------

    async def _seal(self, run: TaskRun) -> None:
        chunks = [run.have[i] for i in range(run.layout.count)]
        try:
            digest = await asyncio.to_thread(self._sha256_of, chunks)
        except (OSError, KeyError) as e:
            log.warning("cannot seal %s: %r", run.task_id, e)
            run.sealing = False
            return
        if digest == run.meta.digest:
            self._sealed(run)
            return
        # A chunk that rotted on disk since it was verified also breaks the digest: drop only
        # the chunks that fail their own id, and condemn the blob only if none does.
        rotten = await asyncio.to_thread(self._rotten_of, chunks)
        run.sealing = False
        if rotten:
            for chunk in rotten:
                self.drop_chunk(chunk)
        else:
            self._corrupt_blob(run)

    def _rotten_of(self, chunks: list[str]) -> list[str]:
        return [c for c in dict.fromkeys(chunks) if not self.store.intact(c)]

    def _sha256_of(self, chunks: list[str]) -> str:
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(self.store.chunk_path(chunk).read_bytes())
        return ids.SHA256_PREFIX + h.hexdigest()

    def _sealed(self, run: TaskRun) -> None:
        """The whole blob hashed here matched. Proven only once every piece is stored: one
        passed through uncached would come back by the scheduler's chunk id, not this hash
        (the seal job proves it when the task is complete)."""
        if run.meta.sealed or not run.complete:
            return
        run.meta = run.meta.model_copy(update={"sealed": True})
        if run.indexed and self._may_write():
            try:
                self.store.mark_sealed(run.task_id)
            except CannotStore as e:  # proven again after a restart
                self._cannot_cache(e)
        self.scheduler.sealed(run.task_id, run.origin.registry)
        log.info("task %s assembled and verified", run.task_id)

    def _corrupt_blob(self, run: TaskRun) -> None:
        """The assembled blob failed its digest: forget every piece, tell the scheduler."""
        self.metrics.verify_failures.inc()
        log.error("task %s failed its digest: dropping its pieces", run.task_id)
        try:
            self.store.drop_task(run.task_id)
            run.indexed = self.store.put_task(run.meta)
        except CannotStore as e:  # nothing more is stored under it in this process
            run.indexed = False
            self._cannot_cache(e)
        run.have.clear()
        run.sealing = False
        self.scheduler.blob_mismatch(run.task_id, run.origin.registry)

    # -- reading ---------------------------------------------------------------------------

    def _window(self, run: TaskRun) -> int:
        return max(2, READAHEAD_BYTES // run.meta.piece_size)

    async def plan(self, run: TaskRun, rng: ByteRange, priority: int = DEFAULT) -> Plan:
        """Start fetching the first pieces of a read and say where they come from."""
        if run.meta.length == 0:
            return Plan("local", ())
        if run.direct:
            return Plan("origin", ("other-registry",))
        pieces = list(run.layout.covering(rng.start, rng.end))[: self._window(run)]
        sources: set[str] = set()
        reasons: list[str] = []
        waited = False
        for i in pieces:
            if self._ensure(run, i, priority) is None:
                sources.add("local")
                continue
            decided = run.decided.get(i)
            if decided is None:  # finished in the meantime
                sources.add("peer")
                continue
            if not decided.done() and not waited:
                waited = True
                await asyncio.wait([decided], timeout=PLAN_WAIT)
            if decided.done() and not decided.cancelled():
                source, reason = decided.result()
                sources.add(source)
                if reason and reason not in reasons:
                    reasons.append(reason)
        source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "peer")
        return Plan(source, tuple(reasons))

    async def read(self, run: TaskRun, rng: ByteRange, expect: str | None = None,
                   priority: int = DEFAULT) -> AsyncIterator[memoryview]:
        """The bytes of `rng`, piece by piece, every byte verified before it is yielded.

        A read of a whole blob is checked against `expect` (the task's own digest for an OCI
        blob, the client's `digest=` for a plain URL) before its last bytes are yielded: on a
        mismatch it raises instead, so the client never sees a complete but wrong body. Only a
        mismatch with the task's own digest condemns the stored pieces; a client's digest for
        a URL may simply be wrong.
        """
        if run.meta.length == 0:
            return
        with self._reading(run):
            views = self._read_direct(run, rng, expect, priority) if run.direct \
                else self._read(run, rng, expect, priority)
            async with contextlib.aclosing(views):
                async for view in views:
                    yield view

    @contextlib.contextmanager
    def _reading(self, run: TaskRun) -> Iterator[None]:
        """A read of the task under way: it counts as the peer's work (no scrubbing) and keeps
        the task from eviction; the task becomes the most recently used."""
        run.readers += 1
        self._update_active()
        try:
            if run.indexed and self._may_write():
                try:
                    self.store.touch(run.task_id, time.time())
                except CannotStore as e:
                    self._cannot_cache(e)
            yield
        finally:
            run.readers -= 1
            self._update_active()

    @contextlib.asynccontextmanager
    async def local_files(self, run: TaskRun, rng: ByteRange, expect: str | None
                          ) -> AsyncIterator[list[tuple[Path, int, int]] | None]:
        """`rng` of a sealed task as (chunk file, offset, count) spans, for sendfile: only with
        --no-verify-on-serve (verifying means reading the bytes anyway), only when every piece
        is stored, its file unchanged since this process wrote or verified it (else `read`
        re-hashes it), and the blob is already proven against `expect`; else None (use
        `read`). The task counts as being read meanwhile, so eviction leaves it alone."""
        proven = run.meta.sealed and expect in (None, run.meta.digest)
        if self.verify_on_serve or not proven or run.meta.length == 0:
            yield None
            return
        layout = run.layout
        spans = []
        for i in layout.covering(rng.start, rng.end):
            chunk = run.have.get(i)
            if chunk is None or not self.store.unchanged(chunk):
                spans = None
                break
            lo, hi = layout.clip(i, rng.start, rng.end)
            spans.append((self.store.chunk_path(chunk), lo, hi - lo))
        if spans is None:
            yield None
            return
        with self._reading(run):
            yield spans
            self.metrics.download_bytes.labels("local").inc(rng.size)

    async def _read(self, run: TaskRun, rng: ByteRange, expect: str | None,
                    priority: int) -> AsyncIterator[memoryview]:
        layout = run.layout
        pieces = list(layout.covering(rng.start, rng.end))
        window = self._window(run)
        whole = rng.start == 0 and rng.end == run.meta.length - 1
        proven = run.meta.sealed and expect == run.meta.digest  # hashed here, never told
        hasher = _Sha256() if whole and expect and not proven else None
        # A reader hashing the task's own digest seals it at the end: one sha256 pass, not a
        # second one in the background (the seal job waits while such a reader runs).
        sealing = hasher is not None and expect == run.meta.digest
        run.hashing += sealing
        # Pieces this read waited for: their bytes come straight from the fetch (already
        # verified) and are counted where they came from, not as store reads.
        fetching: dict[int, asyncio.Future[bytes]] = {}
        ahead = 0  # pieces[:ahead] have been asked for
        # Stored pieces are read (and re-hashed) a few ahead in worker threads, so the disk and
        # blake3 work overlaps with writing the previous piece to the client.
        reading: dict[int, asyncio.Task[bytes]] = {}
        local_ahead = max(1, LOCAL_AHEAD_BYTES // run.meta.piece_size)
        try:
            for k, i in enumerate(pieces):
                # Refill the read-ahead half a window at a time, so the scheduler gets batches
                # (and origin leases cover runs) rather than one piece per call.
                if ahead <= k + window // 2:
                    for j in pieces[ahead:k + window]:
                        fut = self._ensure(run, j, priority)
                        if fut is not None:
                            fetching[j] = fut
                    ahead = max(ahead, min(k + window, len(pieces)))
                for j in pieces[k:k + local_ahead]:
                    if j not in fetching and j not in reading and j in run.have:
                        task = asyncio.create_task(self._piece(run, j, priority))
                        task.add_done_callback(consume_exception)
                        reading[j] = task
                fut = fetching.pop(i, None) or reading.pop(i, None)
                with run.awaiting(i):
                    data = await asyncio.shield(fut) if fut is not None \
                        else await self._piece(run, i, priority)
                lo, hi = layout.clip(i, rng.start, rng.end)
                if hasher is not None:
                    await hasher.update(data)
                    if k == len(pieces) - 1:  # the last bytes go out only once they match
                        got = await hasher.digest()
                        if got != expect:
                            if sealing:
                                self._corrupt_blob(run)
                            raise BlobCorrupt(f"{run.task_id} is {got}, expected {expect}")
                        if sealing:
                            self._sealed(run)
                yield memoryview(data)[lo:hi]
        finally:
            for task in reading.values():  # the reader stopped early
                task.cancel()
            if hasher is not None:
                hasher.cancel()
            if sealing:
                run.hashing -= 1
                self._maybe_seal(run)  # a reader that stopped early leaves it to the job

    async def _read_direct(self, run: TaskRun, rng: ByteRange, expect: str | None,
                           priority: int) -> AsyncIterator[memoryview]:
        """`rng` straight from the client's own registry: a whole blob is checked against
        `expect` before its last bytes go out, like any other read."""
        whole = rng.start == 0 and rng.end == run.meta.length - 1
        hasher = _Sha256() if whole and expect else None
        left = rng.size
        try:
            async with self.origin.open_range(run.origin, rng.start, rng.end,
                                              priority) as stream:
                while left:
                    part = await stream.read(min(_READ_SIZE, left))
                    if not part:
                        raise OriginError(f"origin body of {run.task_id} ended early")
                    left -= len(part)
                    self.metrics.download_bytes.labels("origin").inc(len(part))
                    if hasher is not None:
                        await hasher.update(part)
                        if not left and (got := await hasher.digest()) != expect:
                            raise BlobCorrupt(f"{run.task_id} is {got}, expected {expect}")
                    yield memoryview(part)
        finally:
            if hasher is not None:
                hasher.cancel()

    async def _piece(self, run: TaskRun, index: int, priority: int) -> bytes:
        """A piece's verified bytes: from the store (re-hashed with verify-on-serve), or from
        the fetch already under way."""
        for _ in range(3):
            fut = run.inflight.get(index)
            if fut is not None:
                return await asyncio.shield(fut)
            chunk = run.have.get(index)
            if chunk is None:
                self._ensure(run, index, priority)
                continue
            try:
                data = await self.store.read_chunk(chunk, verify=self.verify_on_serve)
            except (ChunkCorrupt, OSError):  # rotten, gone, or unreadable: fetch it again
                self.drop_chunk(chunk)
                continue
            self.metrics.download_bytes.labels("local").inc(len(data))
            return data
        raise PieceUnavailable(f"piece {index} of {run.task_id} kept failing")

    def prefetch(self, run: TaskRun) -> None:
        """Fetch the rest of a task in the background, at the lowest priority and a few pieces
        at a time: a lazy reader (nydusd) finds later reads local."""
        if self.prefetch_enabled and not run.direct and not run.complete \
                and not run.prefetching:
            run.prefetching = True
            self.tasks.spawn(self._prefetch(run), f"prefetch-{run.task_id[:19]}")

    async def _prefetch(self, run: TaskRun) -> None:
        try:
            async with self._prefetch_slots:
                pending: set[asyncio.Future[bytes]] = set()
                for i in range(run.layout.count):
                    fut = self._ensure(run, i, BACKGROUND)
                    if fut is None:
                        continue
                    pending.add(fut)
                    if len(pending) >= PREFETCH_PIECES:
                        _, pending = await asyncio.wait(pending,
                                                        return_when=asyncio.FIRST_COMPLETED)
                if pending:
                    await asyncio.wait(pending)
        finally:
            run.prefetching = False

    def drop_chunk(self, chunk: str) -> None:
        """A stored chunk failed verification: forget it everywhere so it is fetched again."""
        self.metrics.verify_failures.inc()
        log.error("stored chunk %s is corrupt: dropping it", chunk)
        dropped: dict[str, list[int]] = {}
        try:
            pieces = self.store.drop_chunk(chunk)
        except CannotStore as e:  # its file is gone; the index entries go at the next start
            self._cannot_cache(e)
            pieces = [(t, i) for t, r in self.runs.items() for i, c in r.have.items()
                      if c == chunk]
        for task_id, index in pieces:
            dropped.setdefault(task_id, []).append(index)
            run = self.runs.get(task_id)
            if run is not None:
                run.have.pop(index, None)
                if run.meta.sealed:
                    run.meta = run.meta.model_copy(update={"sealed": False})
        for task_id, indices in dropped.items():
            self.scheduler.withdraw(task_id, indices)
        self.metrics.cache_bytes.set(self.store.bytes)


async def _hash(data: bytes) -> str:
    if len(data) >= 4 * MiB:
        return await asyncio.to_thread(ids.chunk_id, data)
    return ids.chunk_id(data)
