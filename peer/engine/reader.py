"""Readers: the bytes of a range, piece by piece, each verified before it is yielded.

A reader walks the pieces covering its range in order with a bounded read-ahead
(`readahead_pieces` asked for, in the order peer/engine/ask_plan.py says; LOCAL_AHEAD_BYTES of
stored pieces read and re-hashed in worker threads), so the first byte goes out before the
last piece is fetched and memory stays flat: a piece fetched further ahead than HELD_BYTES is
not held once stored (`holds`), it is read back from the store (the page cache) when the
reader gets there. With FAR_SHARE (off), a whole-blob read also keeps some of a window in
flight from a point of the blob drawn for the read (`split_window`, ask_plan.py's
`far_pieces`), so hosts reading one blob at once do not all want the same pieces; a fast
whole-blob read draws most of its window ahead (the spread share, ask_plan.py). A whole-blob
read is checked against its digest before its last bytes go out. Also: where a read's bytes
will come from (`plan`, for the response headers), sendfile spans of a proven task
(`local_files`), and the background prefetch of the rest of a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from common.limits import BACKGROUND, DEFAULT
from common.metrics import PeerMetrics
from common.pieces import MiB
from common.ranges import ByteRange
from common.tasks import TaskSet, consume_exception
from peer.engine.ask_plan import AskPlan, ahead_priority, spreads
from peer.engine.origin import READ_SIZE
from peer.engine.run import BlobCorrupt, PieceUnavailable, Plan, TaskRun
from peer.engine.sealing import Sealer, Sha256
from peer.engine.seams import Clock, OriginSource
from peer.engine.storing import Storage
from peer.origin import OriginError
from peer.store import ChunkCorrupt, ChunkStore

# Asked for ahead of a reader: what fills a fast link is pieces in flight (flows from distinct
# parents): 16 MiB kept 4 pieces of 4 MiB in flight, a third of a 300 MB/s link (bench.sim
# kraken). So 16 pieces, at most 64 MiB: pieces under PIECE_FLOOR count as PIECE_FLOOR, so small
# pieces keep today's 16 MiB (no more re-reads, `holds`), 16 MiB pieces get 4. 128 MiB with one
# child per holder made bench.sim kraken 1.35x the bound from 1.95x at a cost in scheduler waits
# (scheduler/state.py CHILDREN_PER_HOLDER says how much); fetched pieces beyond HELD_BYTES are
# stored, not held, either way.
READAHEAD_BYTES = 64 * MiB
PIECE_FLOOR = 4 * MiB
READAHEAD_MIN_PIECES = 4
LOCAL_AHEAD_BYTES = 4 * MiB  # stored pieces read ahead of a reader
# Fetched pieces this near a reader keep their bytes until it gets there (the memory today's
# 16 MiB window took); further ones are read back when reached: a store read and, with
# verify-on-serve, a second hash each.
HELD_BYTES = 16 * MiB
PASS_THROUGH_BYTES = 16 * MiB  # the window once pieces pass through uncached (all held)
# A whole-blob read keeps, beside its window in order (what the client reads next), FAR_SHARE
# quarters of a window in flight from its far cursor. Every host reading in order made all of
# them want the same few pieces at once: the origin fed one lease holder at a time at that
# host's downlink, and each piece spread as a tree of busy holders (bench.sim kraken, 50 hosts:
# 2.11x the fluid bound, 13,200 decisions/s). Started apart, hosts take origin runs at several
# points and hold what the others lack: 1.19x, 7,387 decisions/s. Asking only a quarter of the
# window in order (the rest far) gave kraken a better p99 (1.28x, not 1.38x) but slowed
# origin-bound swarms (lab16 p50 1.40x -> 1.44x; this: 1.39x) and a lone reader's pipeline
# (refills of 2 pieces). FAR_SHARE = 0 is the old order.
# Off by default (stop 20): on two cores the lab at 16 x 256 MiB, origin-bound and CPU-bound,
# took 2.07-2.26x the bound with 3, 1.80-1.99x without (the far pieces' read-backs and re-hashes,
# more decisions, a later first copy); bench.sim idc3 sent 2.42x the blob across IDCs (2.00x
# without: a far piece's lease lands outside the origin's IDC); a quarter of faulty hosts took
# the origin from 1.00x to 1.39-1.52x. `python -m bench.sim --experiment far-share` runs it.
FAR_SHARE = 0
PLAN_WAIT = 2.0
PREFETCH_PIECES = 4  # background prefetch: pieces in flight per task
PREFETCH_TASKS = 2  # tasks prefetched at once

# Start obtaining a piece unless stored or on its way: (run, index, priority) -> its future,
# None when stored.
Ensure = Callable[[TaskRun, int, int], "asyncio.Future[bytes] | None"]


def readahead_pieces(piece_size: int, readahead: int = READAHEAD_BYTES) -> int:
    """Pieces a reader keeps asked for ahead of itself (bench/sim models the same window)."""
    return max(READAHEAD_MIN_PIECES, readahead // max(piece_size, PIECE_FLOOR))


def split_window(window: int, whole: bool, far_share: int | None = None) -> tuple[int, int]:
    """(pieces asked in order, pieces asked from the far cursor) for a read with this window.
    A ranged read (nydusd's) asks in order and nothing beyond its range; a whole-blob read will
    need every piece, so it may also keep some in flight anywhere in the blob (`far_share`
    quarters of a window, FAR_SHARE unless given)."""
    share = FAR_SHARE if far_share is None else far_share
    return window, window * share // 4 if whole else 0


def local_ahead(piece_size: int) -> int:
    """Pieces just ahead of a reader whose bytes it holds or reads from the store early."""
    return max(1, LOCAL_AHEAD_BYTES // piece_size)


def holds(offset: int, stored: bool, piece_size: int) -> bool:
    """Whether a reader keeps the bytes of a fetched piece `offset` pieces ahead of it: those
    within HELD_BYTES, and those not stored (passed through: nowhere else to get them)."""
    return not stored or offset < max(1, HELD_BYTES // piece_size)


def _whole(run: TaskRun, rng: ByteRange) -> bool:
    return rng.start == 0 and rng.end == run.meta.length - 1


class Reader:
    def __init__(self, store: ChunkStore, storage: Storage, sealer: Sealer,
                 origin: OriginSource, metrics: PeerMetrics, ensure: Ensure,
                 on_activity: Callable[[], None], tasks: TaskSet, clock: Clock,
                 verify_on_serve: bool = True, prefetch: bool = True, idc: str = "") -> None:
        self.store = store
        self.idc = idc  # this peer's IDC label: none, and whole reads may spread (ask_plan.py)
        self.storage = storage
        self.sealer = sealer
        self.origin = origin
        self.metrics = metrics
        self.ensure = ensure
        self.on_activity = on_activity
        self.tasks = tasks
        self.clock = clock
        self.verify_on_serve = verify_on_serve
        self.prefetch_enabled = prefetch
        self._prefetch_slots = asyncio.Semaphore(PREFETCH_TASKS)
        self.held_bytes = 0  # fetched pieces' bytes readers hold until they reach them
        self.rng = random.Random()  # where whole reads' far cursors start

    async def plan(self, run: TaskRun, rng: ByteRange, priority: int = DEFAULT) -> Plan:
        """Start fetching the first pieces of a read and say where they come from."""
        if run.meta.length == 0:
            return Plan("local", ())
        if run.direct:
            return Plan("origin", ("other-registry",))
        window, _ = split_window(readahead_pieces(run.meta.piece_size), _whole(run, rng))
        pieces = list(run.layout.covering(rng.start, rng.end))[:window]
        sources: set[str] = set()
        reasons: list[str] = []
        waited = False
        for i in pieces:
            if self.ensure(run, i, priority) is None:
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
        run.reads += 1
        self.on_activity()
        try:
            self.storage.touch(run, time.time())
            yield
        finally:
            run.readers -= 1
            self.on_activity()

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
        size = run.meta.piece_size
        whole = _whole(run, rng)
        window, far = split_window(readahead_pieces(size), whole)
        proven = run.meta.sealed and expect == run.meta.digest  # hashed here, never told
        hasher = Sha256() if whole and expect and not proven else None
        # A reader hashing the task's own digest seals it at the end: one sha256 pass, not a
        # second one in the background (the seal job waits while such a reader runs).
        sealing = hasher is not None and expect == run.meta.digest
        run.hashing += sealing
        # Pieces this read asked for: the bytes of those near (or not stored) come straight
        # from the fetch (already verified) and are counted where they came from, not as
        # store reads; those far ahead and stored are let go on arrival (`dropped`) and read
        # back from the store when reached.
        fetching: dict[int, asyncio.Future[bytes]] = {}
        dropped: set[int] = set()
        held: dict[int, int] = {}  # arrived and kept: their sizes
        k = 0
        # What to ask for and when (ask_plan.py): the window in order, a whole read's far
        # share (pieces[m] is piece m) from a cursor drawn per read, topped up as they arrive.
        # A fast whole read also draws most of its window ahead (the spread share), at its rate.
        plan = AskPlan(len(pieces), window, far, self.rng.randrange,
                       spread=spreads(whole, self.idc),
                       piece_size=size, since=self.clock.monotonic())

        def top_up() -> None:
            plan.top_up(start_ahead, self.clock.monotonic())

        def start_ahead(j: int) -> bool:
            """Piece j asked ahead, unless stored or on its way (this read's or another's)."""
            return j not in run.have and j not in run.inflight \
                and ask(j, j, ahead_priority(priority))

        def ask(m: int, j: int, priority: int) -> bool:
            """Whether this read now fetches piece j (pieces[m]) that it did not before."""
            fut = self.ensure(run, j, priority)
            if fut is None or j in fetching:
                return False
            fetching[j] = fut
            fut.add_done_callback(functools.partial(arrived, m, j))
            return True

        def arrived(m: int, j: int, fut: asyncio.Future[bytes]) -> None:
            keep(m, j, fut)
            ok = not fut.cancelled() and fut.exception() is None
            if plan.arrived(m, len(fut.result()) if ok else 0) and ok:
                top_up()  # (not the engine closing)

        def keep(m: int, j: int, fut: asyncio.Future[bytes]) -> None:
            if fetching.get(j) is not fut or fut.cancelled() or fut.exception() is not None:
                return
            stored = j in run.have
            if not stored:  # passed through: the store may not take the rest
                plan.passed_through(max(READAHEAD_MIN_PIECES, PASS_THROUGH_BYTES // size))
            if holds(m - k, stored, size):
                held[j] = len(fut.result())
                self.held_bytes += held[j]
            else:
                del fetching[j]
                dropped.add(j)

        # Stored pieces are read (and re-hashed) a few ahead in worker threads, so the disk and
        # blake3 work overlaps with writing the previous piece to the client.
        reading: dict[int, asyncio.Task[bytes]] = {}
        near = local_ahead(size)
        try:
            for k, i in enumerate(pieces):
                for m in plan.reached(k):
                    ask(m, pieces[m], priority)
                top_up()
                for j in pieces[k:k + near]:
                    if j not in fetching and j not in reading and j in run.have:
                        task = asyncio.create_task(self._piece(run, j, priority, j in dropped))
                        task.add_done_callback(consume_exception)
                        reading[j] = task
                fut = fetching.pop(i, None) or reading.pop(i, None)
                self.held_bytes -= held.pop(i, 0)
                with run.awaiting(i, self.clock.monotonic()):
                    data = await asyncio.shield(fut) if fut is not None \
                        else await self._piece(run, i, priority, i in dropped)
                lo, hi = layout.clip(i, rng.start, rng.end)
                if hasher is not None:
                    await hasher.update(data)
                    if k == len(pieces) - 1:  # the last bytes go out only once they match
                        got = await hasher.digest()
                        if got != expect:
                            if sealing:
                                self.sealer.corrupt_blob(run)
                            raise BlobCorrupt(f"{run.task_id} is {got}, expected {expect}")
                        if sealing:
                            self.sealer.sealed(run)
                yield memoryview(data)[lo:hi]
        finally:
            plan.stop()  # arrivals after this ask for no more,
            fetching.clear()  # nor are they held
            self.held_bytes -= sum(held.values())
            for task in reading.values():  # the reader stopped early
                task.cancel()
            if hasher is not None:
                hasher.cancel()
            if sealing:
                run.hashing -= 1
                self.sealer.maybe_seal(run)  # a reader that stopped early leaves it to the job

    async def _read_direct(self, run: TaskRun, rng: ByteRange, expect: str | None,
                           priority: int) -> AsyncIterator[memoryview]:
        """`rng` straight from the client's own registry: a whole blob is checked against
        `expect` before its last bytes go out, like any other read."""
        whole = rng.start == 0 and rng.end == run.meta.length - 1
        hasher = Sha256() if whole and expect else None
        left = rng.size
        try:
            async with self.origin.open_range(run.origin, rng.start, rng.end,
                                              priority) as stream:
                while left:
                    part = await stream.read(min(READ_SIZE, left))
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

    async def _piece(self, run: TaskRun, index: int, priority: int,
                     fetched: bool = False) -> bytes:
        """A piece's verified bytes: from the store (re-hashed with verify-on-serve, even a
        piece this read fetched and let go moments ago; without it, re-hashed when its file
        changed since written: `ChunkStore.read_chunk`), or from the fetch already under way.
        A piece this read `fetched` was counted where it came from."""
        for _ in range(3):
            fut = run.inflight.get(index)
            if fut is not None:
                return await asyncio.shield(fut)
            chunk = run.have.get(index)
            if chunk is None:
                self.ensure(run, index, priority)
                continue
            try:
                data = await self.store.read_chunk(chunk, verify=self.verify_on_serve)
            except (ChunkCorrupt, OSError):  # rotten, gone, or unreadable: fetch it again
                self.storage.drop_chunk(chunk)
                continue
            if not fetched:
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
                    fut = self.ensure(run, i, BACKGROUND)
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
