"""The engine assembled: a task's run opened, one worker per missing piece (in-peer single
flight, shared by every reader), each piece's acquisition driven through the seams, and what
is obtained kept, announced and sealed. The parts: peer/engine/acquire.py (the rules),
batcher.py, fetch.py (parents), origin.py (origin runs), storing.py and budget.py (the disk),
sealing.py (verification), reader.py (readers and prefetch).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from common.flight import SingleFlight
from common.limits import DEFAULT, ON_DEMAND
from common.metrics import PeerMetrics
from common.models import TaskMeta, TaskRequest
from common.pieces import default_piece_size
from common.ranges import ByteRange
from common.tasks import Activity, TaskSet, consume_exception
from peer.engine.acquire import (
    Acquisition,
    Ask,
    AwaitScheduler,
    Decided,
    Event,
    Fetch,
    FromOrigin,
    GiveUp,
    NoDecision,
    OriginFailed,
    ParentsFailed,
    Pause,
    Paused,
    Step,
    Waited,
)
from peer.engine.batcher import DecisionBatcher
from peer.engine.budget import DiskBudget
from peer.engine.fetch import ParentFetch
from peer.engine.origin import LeaseLapsed, OriginRuns
from peer.engine.reader import Reader
from peer.engine.run import LengthConflict, PieceUnavailable, Plan, TaskRun
from peer.engine.sealing import Sealer, chunk_id_of
from peer.engine.seams import ChunkSource, Clock, OriginSource, RandomSource, Scheduler, SystemClock
from peer.engine.storing import Storage
from peer.origin import OriginError, OriginRequest
from peer.sched_transport import SchedulerRefused, SchedulerUnavailable
from peer.store import CannotStore, ChunkCorrupt, ChunkStore

log = logging.getLogger("naiad.peer.engine")


class Engine:
    def __init__(self, *, peer_id: str, store: ChunkStore, scheduler: Scheduler,
                 origin: OriginSource, parents: ChunkSource, metrics: PeerMetrics,
                 verify_on_serve: bool = True, piece_size: int | None = None,
                 prefetch: bool = True, disk_quota: int | None = None,
                 clock: Clock | None = None, rng: RandomSource | None = None,
                 idc: str = "") -> None:
        self.peer_id = peer_id
        self.store = store
        self.scheduler = scheduler
        self.metrics = metrics
        self.piece_size = piece_size
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        store.stamping = not verify_on_serve  # unverified reads only of untouched files
        self.runs: dict[str, TaskRun] = {}
        self.activity = Activity()  # pieces being fetched or tasks being read
        self._opening: SingleFlight[str, TaskRun] = SingleFlight()
        self.tasks = TaskSet("engine")
        self.storage = Storage(store, scheduler, metrics, self.runs, DiskBudget(disk_quota),
                               self.clock)
        self.sealer = Sealer(store, self.storage, scheduler, metrics, self.tasks)
        self.parents = ParentFetch(peer_id, parents, scheduler, self._keep, metrics)
        self.origin = OriginRuns(origin, scheduler, self._keep, metrics, self.tasks,
                                 self.clock)
        self.reader = Reader(store, self.storage, self.sealer, origin, metrics, self._ensure,
                             self._update_active, self.tasks, self.clock,
                             verify_on_serve=verify_on_serve, prefetch=prefetch, idc=idc)

    async def close(self) -> None:
        await self.tasks.close()

    # -- tasks -----------------------------------------------------------------------------

    async def open(self, task_id: str, length: int, digest: str | None,
                   origin: OriginRequest) -> TaskRun:
        """The run for a task, learning its piece layout from the store, else the scheduler,
        else (no scheduler) the default every peer computes alike."""
        run = self.runs.get(task_id)
        if run is None or run.meta.length != length:
            joining = task_id in self._opening  # another client's open: its run, for this one
            run = await self._opening.run(task_id,
                                          lambda: self._open(task_id, length, digest, origin))
            if not joining:
                run.opened(self.clock.monotonic())
                return run
        run = self._for_client(run, origin)
        run.opened(self.clock.monotonic())
        return run

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
                self.storage.cannot_cache(e)
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
            indexed = self.storage.index_task(meta)
        run = TaskRun(meta=meta, origin=origin, indexed=indexed,
                      have=self.store.pieces(task_id) if indexed else {})
        run.batcher = DecisionBatcher(self.scheduler, task_id, self.tasks,
                                      lambda i: run.priority.get(i, DEFAULT),
                                      lambda: run.origin.registry, self.clock)
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
        """Drive the piece's `Acquisition` through the seams until a step delivers it."""
        assert run.batcher is not None
        acq = Acquisition(self.rng)
        step: Step = acq.start(self.clock.monotonic())
        error: Exception | None = None
        while True:
            event: Event
            if isinstance(step, Fetch | FromOrigin) and not decided.done():
                decided.set_result((step.source, step.reason))  # what the headers say
            match step:
                case Ask(exclude=exclude):
                    try:
                        event = Decided(await run.batcher.decide(index, exclude))
                    except (SchedulerUnavailable, SchedulerRefused) as e:
                        log.debug("no decision for piece %d of %s: %s", index, run.task_id, e)
                        event = NoDecision(isinstance(e, SchedulerUnavailable),
                                           run.known.pop(index, None))  # tried once
                case Fetch(chunk=chunk, parents=parents, report=report):
                    if report:
                        run.known[index] = (chunk, list(parents))
                    data, failed = await self.parents.piece(run, index, chunk, list(parents),
                                                            report=report)
                    if data is not None:
                        return data
                    event = ParentsFailed(frozenset(failed))
                case Pause(seconds=seconds):
                    await self.clock.sleep(seconds)
                    event = Paused()
                case AwaitScheduler(seconds=seconds):
                    back = await self.scheduler.wait_back(seconds)
                    event = Waited(back, not back and self.scheduler.recently_lost())
                case FromOrigin(epoch=epoch, first=first, last=last):
                    try:
                        if epoch is None:
                            return await self.origin.piece(run, None, index, index)
                        assert first is not None and last is not None
                        return await self.origin.piece(run, epoch, first, last, index)
                    except OriginError as e:
                        error = e
                        event = OriginFailed(lapsed=isinstance(e, LeaseLapsed))
                case GiveUp():
                    assert error is not None
                    raise error
            step = acq.send(event, self.clock.monotonic(),
                            run.priority.get(index, DEFAULT) >= ON_DEMAND,
                            run.awaited_since(index))

    async def _keep(self, run: TaskRun, index: int, chunk: str, data: bytes,
                    source: str, verify: bool = False) -> None:
        """Store verified bytes, count them, announce them; seal the task when complete.
        With `verify`, bytes not checked yet: hashed first (with the store's write, in one
        hand-off) and ChunkCorrupt if they are not `chunk`, nothing stored, counted or told.

        A store that cannot take them (quota, free-space floor, a full, read-only or failing
        disk) degrades to passing the bytes through uncached: the reader still gets them,
        nobody is told this peer holds them."""
        stored = await self.storage.put(run, index, chunk, data, verify)
        if not stored and verify and await chunk_id_of(data) != chunk:
            raise ChunkCorrupt(chunk)
        self.metrics.download_bytes.labels(source).inc(len(data))
        if not stored:
            return
        run.have[index] = chunk
        self.scheduler.announce(run.task_id, index, chunk, run.origin.registry, source)
        self.sealer.maybe_seal(run)

    def drop_chunk(self, chunk: str) -> None:
        """A stored chunk failed verification: forget it everywhere so it is fetched again."""
        self.storage.drop_chunk(chunk)

    # -- reading (peer/engine/reader.py) ---------------------------------------------------

    async def plan(self, run: TaskRun, rng: ByteRange, priority: int = DEFAULT) -> Plan:
        """Start fetching the first pieces of a read and say where they come from."""
        return await self.reader.plan(run, rng, priority)

    def read(self, run: TaskRun, rng: ByteRange, expect: str | None = None,
             priority: int = DEFAULT) -> AsyncIterator[memoryview]:
        """The bytes of `rng`, every byte verified before it is yielded (`Reader.read`)."""
        return self.reader.read(run, rng, expect, priority)

    def local_files(self, run: TaskRun, rng: ByteRange, expect: str | None
                    ) -> AbstractAsyncContextManager[list[tuple[Path, int, int]] | None]:
        """Sendfile spans of a proven task, or None (`Reader.local_files`)."""
        return self.reader.local_files(run, rng, expect)

    def prefetch(self, run: TaskRun) -> None:
        """Fetch the rest of a task in the background (`Reader.prefetch`)."""
        self.reader.prefetch(run)
