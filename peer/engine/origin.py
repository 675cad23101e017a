"""Origin runs: pieces first..last from one ranged origin request.

Under a lease (an epoch), every worker of a piece in the run shares the one request; each piece
is hashed, stored and announced as it arrives, and the lease is kept alive by progress reports
every PROGRESS_EVERY seconds. Without one (a single piece: scheduler unreachable, parents
failed or busy, an on-demand bypass) the run is that piece alone. A run that fails fails every
piece still waiting, never leaves one pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from common.limits import BACKGROUND, DEFAULT
from common.metrics import PeerMetrics
from common.tasks import TaskSet, consume_exception
from peer.engine.run import OriginRun, TaskRun
from peer.engine.sealing import chunk_id_of
from peer.engine.seams import Clock, OriginSource, Scheduler
from peer.origin import OriginError
from peer.p2p.buffers import Buffers

log = logging.getLogger("naiad.peer.engine")

PROGRESS_EVERY = 0.5
# The scheduler's default --lease-timeout: a lease whose progress it has not heard of for this
# long is handed to another peer. A run whose scheduler answered nothing for this long at any
# point since the run began (an outage, a partition) stops between pieces: fetching on would
# double the origin's bytes.
LEASE_LAPSE = 2.0
STORE_AHEAD = 4  # pieces read from the origin but not yet stored, at most
# Reused piece buffers: what one pull keeps in use (a reader's HELD_BYTES, STORE_AHEAD per
# run, the store's queue) with room to spare; beyond it a piece gets a fresh buffer.
ORIGIN_BUFFERS = 32 << 20
READ_SIZE = 256 << 10  # a direct read's parts (peer/engine/reader.py)

# Keep a verified piece: (run, index, chunk id, bytes, source).
Keep = Callable[[TaskRun, int, str, bytes, str], Awaitable[None]]


class LeaseLapsed(OriginError):
    """An origin run stopped because its lease has lapsed by now."""


class OriginRuns:
    def __init__(self, origin: OriginSource, scheduler: Scheduler, keep: Keep,
                 metrics: PeerMetrics, tasks: TaskSet, clock: Clock) -> None:
        self.origin = origin
        self.scheduler = scheduler
        self.keep = keep
        self.metrics = metrics
        self.tasks = tasks
        self.clock = clock
        self.buffers = Buffers(ORIGIN_BUFFERS)  # let go when the engine is idle

    async def piece(self, run: TaskRun, epoch: int | None, first: int, last: int,
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
            self.tasks.spawn(self._run(run, epoch, orun), f"origin-{first}-{last}")
        return await asyncio.shield(orun.pieces[index])

    async def _run(self, run: TaskRun, epoch: int | None, orun: OriginRun) -> None:
        """Read pieces first..last from one ranged origin request. Storing a piece overlaps
        with reading the next (at most STORE_AHEAD pieces in memory)."""
        layout = run.layout
        start = layout.span(orun.first)[0]
        end = sum(layout.span(orun.last)) - 1
        begun = last_progress = self.clock.monotonic()
        storing: set[asyncio.Task[None]] = set()
        lapsed: LeaseLapsed | None = None
        try:
            priority = max((run.priority.get(i, BACKGROUND)
                            for i in range(orun.first, orun.last + 1)), default=DEFAULT)
            async with self.origin.open_range(run.origin, start, end, priority) as stream:
                for i in range(orun.first, orun.last + 1):
                    if epoch is not None and self._lapsed(begun):
                        lapsed = LeaseLapsed(f"lease {epoch} of {run.task_id} lapsed at piece "
                                             f"{i}: no answer from the scheduler for "
                                             f"{LEASE_LAPSE} s")
                        break
                    started = time.perf_counter()
                    _, size = layout.span(i)
                    # The piece's bytes are copied once, into a reused buffer: reads of the
                    # rest of the piece take the stream's blocks as they are, where a join
                    # of fixed-size reads into a fresh block copied each byte twice more
                    # (and page-faulted the new block in).
                    data = self.buffers.take(size)
                    with memoryview(data) as view:
                        got = 0
                        while got < size:
                            part = await stream.read(size - got)
                            if not part:
                                raise OriginError(f"origin body ended inside piece {i}")
                            view[got:got + len(part)] = part
                            got += len(part)
                            if epoch is not None and self.clock.monotonic() - last_progress \
                                    > PROGRESS_EVERY:
                                last_progress = self.clock.monotonic()
                                self.scheduler.progress(run.task_id, epoch)
                    storing.add(asyncio.create_task(
                        self._keep_piece(run, orun, i, data, started)))
                    if len(storing) >= STORE_AHEAD:
                        _, storing = await asyncio.wait(storing,
                                                        return_when=asyncio.FIRST_COMPLETED)
                if storing:  # what was read is kept, lapsed or not
                    await asyncio.gather(*storing)
            if lapsed is not None:
                raise lapsed
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
            log_at = logging.INFO if isinstance(e, LeaseLapsed) else logging.WARNING
            log.log(log_at, "origin run %d-%d of %s failed: %r", orun.first, orun.last,
                        run.task_id, e)
        finally:
            for f in orun.pieces.values():  # a waiter is never left pending, whatever failed
                if not f.done():
                    f.set_exception(OriginError(f"origin run {orun.first}-{orun.last} of "
                                                f"{run.task_id} ended without this piece"))
            if epoch is not None and run.origin_runs.get(epoch) is orun:
                del run.origin_runs[epoch]

    def _lapsed(self, begun: float) -> bool:
        """Whether the lease of a run begun at `begun` has lapsed by now: at some point since,
        the scheduler answered nothing (so heard none of the run's progress) for LEASE_LAPSE —
        also when it answers again now (an origin flap takes the scheduler with it, and the
        run's stalled read resumes with the link)."""
        return self.scheduler.longest_silence(begun) > LEASE_LAPSE

    async def _keep_piece(self, run: TaskRun, orun: OriginRun, index: int, data: bytes,
                          started: float) -> None:
        """Keep a piece the origin sent; its readers get the bytes whether or not that works
        (asyncio.wait in the run does not look at this task's outcome)."""
        fut = orun.pieces[index]
        try:
            chunk = await chunk_id_of(data)
            if index not in run.have:
                await self.keep(run, index, chunk, data, "origin")
                self.metrics.piece_seconds.labels("origin").observe(
                    time.perf_counter() - started)
        except Exception as e:
            log.error("piece %d of %s passed through, not kept: %r", index, run.task_id, e)
        finally:
            if not fut.done():
                fut.set_result(data)
