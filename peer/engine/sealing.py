"""Verification: a piece's blake3, and the whole blob's sha256 (sealing).

A task is proven locally when every piece is stored and the sha256 of the assembled blob,
hashed here, matches its digest; only this peer's own hash proves it (the scheduler's `sealed`
is advice). A whole-blob reader hashes beside its stream and seals at its end (`Sha256`); else a
seal job hashes the stored chunks. A mismatch drops the chunks that fail their own id (rot at
rest) or, if none does, condemns the blob: its pieces are dropped and the scheduler told.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from common import ids
from common.metrics import PeerMetrics
from common.pieces import MiB
from common.tasks import TaskSet, consume_exception
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


class Sha256:
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
