"""Verification: a piece's blake3, and the whole blob's sha256 (sealing).

A task is proven locally when every piece is stored and the sha256 of the assembled blob,
hashed here, matches its digest; only this peer's own hash proves it (the scheduler's `sealed`
is advice). A whole-blob reader hashes beside its stream and seals at its end (`Sha256`); else a
seal job hashes the stored chunks. A mismatch drops the chunks that fail their own id (rot at
rest) or, if none does, condemns the blob: its pieces are dropped and the scheduler told.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import threading

from common import ids
from common.metrics import PeerMetrics
from common.pieces import MiB
from common.tasks import TaskSet
from peer.engine.run import TaskRun
from peer.engine.seams import Scheduler
from peer.engine.storing import Storage
from peer.store import CannotStore, ChunkStore

log = logging.getLogger("naiad.peer.engine")


async def chunk_id_of(data: bytes) -> str:
    """The blake3 chunk id of a piece's bytes; a large piece is hashed in a worker thread."""
    if len(data) >= 4 * MiB:
        return await asyncio.to_thread(ids.chunk_id, data)
    return ids.chunk_id(data)


HASH_BEHIND = 8 * MiB  # bytes a stream may be ahead of its sha256 before it waits for it
HASH_IDLE = 5.0  # seconds without a piece before a hasher's thread ends (the next starts one)


class Sha256:
    """A whole-blob sha256 computed beside the stream by a thread of its own (hashlib releases
    the GIL), fed in order without waking the loop: a piece costs a queue append, not a task, an
    executor hand-off and a wake-up (~5 % of a receiving peer's loop in bench/profile_p2p.py).
    The loop waits for the thread only at the digest, or while the stream is more than
    `behind` bytes ahead of it (a queued piece keeps its buffer)."""

    def __init__(self, behind: int = HASH_BEHIND) -> None:
        self._hash = hashlib.sha256()
        self._behind = behind
        self._more = threading.Condition()
        self._queue: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self._queued = 0  # bytes in the queue or being hashed
        self._running = False
        self._ending = False  # digest asked: hash what is queued, then end
        self._cancelled = False
        self._failed: BaseException | None = None
        # What the loop waits for, with its loop: room in the queue, or the thread's end.
        self._room: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def update(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        with self._more:
            if self._cancelled or self._ending:
                raise RuntimeError("sha256 updated after its digest or cancel")
            self._loop = asyncio.get_running_loop()
            self._queue.append(data)
            self._queued += len(data)
            self._more.notify()
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="naiad-sha256", daemon=True).start()
            if self._queued <= self._behind:
                return
            room = self._room = self._loop.create_future()
        await room

    async def digest(self) -> str:
        with self._more:
            self._ending = True
            self._more.notify()
            ended = None
            if self._running:
                assert self._loop is not None
                ended = self._ended = self._loop.create_future()
        if ended is not None:
            await ended
        if self._failed is not None:
            raise self._failed
        return ids.SHA256_PREFIX + self._hash.hexdigest()

    def cancel(self) -> None:
        """Stop hashing (what is queued is dropped); the thread ends by itself."""
        with self._more:
            self._cancelled = True
            self._queue.clear()
            self._more.notify()

    def _run(self) -> None:
        while True:
            with self._more:
                if not self._queue and not self._ending and not self._cancelled:
                    self._more.wait(HASH_IDLE)
                if not self._queue or self._cancelled:
                    self._running = False
                    self._wake(self._ended)
                    self._ended = None
                    return
                data = self._queue[0]
            try:
                if self._failed is None:
                    self._hash.update(data)
            except BaseException as e:  # told at the digest
                self._failed = e
            with self._more:
                if self._queue and self._queue[0] is data:  # not cancelled meanwhile
                    self._queue.popleft()
                self._queued -= len(data)
                del data
                if self._room is not None and self._queued <= self._behind:
                    self._wake(self._room)
                    self._room = None

    def _wake(self, fut: asyncio.Future[None] | None) -> None:
        """From the thread, with the lock held: answer what the loop waits on."""
        if fut is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits
            self._loop.call_soon_threadsafe(_set, fut)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Sealer:
    def __init__(self, store: ChunkStore, storage: Storage, scheduler: Scheduler,
                 metrics: PeerMetrics, tasks: TaskSet) -> None:
        self.store = store
        self.storage = storage
        self.scheduler = scheduler
        self.metrics = metrics
        self.tasks = tasks

    def maybe_seal(self, run: TaskRun) -> None:
        """Check a complete task's digest in the background, unless a whole-blob reader is
        hashing it already (it seals as it finishes: one sha256 pass, not two)."""
        if run.complete and run.meta.digest and not run.meta.sealed and not run.sealing \
                and not run.hashing:
            run.sealing = True
            self.tasks.spawn(self._seal(run), f"seal-{run.task_id[:19]}")

    async def _seal(self, run: TaskRun) -> None:
        chunks = [run.have[i] for i in range(run.layout.count)]
        try:
            digest = await asyncio.to_thread(self._sha256_of, chunks)
        except (OSError, KeyError) as e:
            log.warning("cannot seal %s: %r", run.task_id, e)
            run.sealing = False
            return
        if digest == run.meta.digest:
            self.sealed(run)
            return
        # A chunk that rotted on disk since it was verified also breaks the digest: drop only
        # the chunks that fail their own id, and condemn the blob only if none does.
        rotten = await asyncio.to_thread(self._rotten_of, chunks)
        run.sealing = False
        if rotten:
            for chunk in rotten:
                self.storage.drop_chunk(chunk)
        else:
            self.corrupt_blob(run)

    def _rotten_of(self, chunks: list[str]) -> list[str]:
        return [c for c in dict.fromkeys(chunks) if not self.store.intact(c)]

    def _sha256_of(self, chunks: list[str]) -> str:
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(self.store.chunk_path(chunk).read_bytes())
        return ids.SHA256_PREFIX + h.hexdigest()

    def sealed(self, run: TaskRun) -> None:
        """The whole blob hashed here matched. Proven only once every piece is stored: one
        passed through uncached would come back by the scheduler's chunk id, not this hash
        (the seal job proves it when the task is complete)."""
        if run.meta.sealed or not run.complete:
            return
        run.meta = run.meta.model_copy(update={"sealed": True})
        if run.indexed and self.storage.may_write():
            try:
                self.store.mark_sealed(run.task_id)
            except CannotStore as e:  # proven again after a restart
                self.storage.cannot_cache(e)
        self.scheduler.sealed(run.task_id, run.origin.registry)
        log.info("task %s assembled and verified", run.task_id)

    def corrupt_blob(self, run: TaskRun) -> None:
        """The assembled blob failed its digest: forget every piece, tell the scheduler."""
        self.metrics.verify_failures.inc()
        log.error("task %s failed its digest: dropping its pieces", run.task_id)
        try:
            self.store.drop_task(run.task_id)
            run.indexed = self.store.put_task(run.meta)
        except CannotStore as e:  # nothing more is stored under it in this process
            run.indexed = False
            self.storage.cannot_cache(e)
        run.have.clear()
        run.sealing = False
        self.scheduler.blob_mismatch(run.task_id, run.origin.registry)
