"""Keeping verified pieces in the store within the disk budget, and degrading to pass-through.

A store that cannot take a piece (quota, free-space floor, a full, read-only or failing disk)
means "cannot cache" for FULL_BACKOFF seconds: the bytes still reach the reader, nobody is told
this peer holds them, nothing verified is dropped. A write that failed for want of space evicts
least recently used tasks; a task being read or fetched is never evicted.
"""

from __future__ import annotations

import logging

from common.metrics import PeerMetrics
from common.models import TaskMeta
from peer.engine.budget import DiskBudget, Floor
from peer.engine.run import TaskRun
from peer.engine.seams import Clock, Scheduler
from peer.store import CannotStore, ChunkStore

log = logging.getLogger("naiad.peer.engine")

FULL_BACKOFF = 5  # seconds without caching after a write of the store failed
OPEN_HOLD = 10.0  # at most this long after an open, eviction waits for its read to begin


class Storage:
    def __init__(self, store: ChunkStore, scheduler: Scheduler, metrics: PeerMetrics,
                 runs: dict[str, TaskRun], budget: DiskBudget, clock: Clock) -> None:
        self.store = store
        self.scheduler = scheduler
        self.metrics = metrics
        self.runs = runs  # the engine's: evicted tasks leave it
        self.budget = budget
        self.clock = clock
        self._full_until = 0.0  # no write of the store is tried before this
        self._caching = store.read_only is None  # false from a failed write to the next success

    async def put(self, run: TaskRun, index: int, chunk: str, data: bytes,
                  verify: bool = False) -> bool:
        """Store a verified piece; whether it is stored (else it passes through uncached).
        With `verify`, bytes not checked yet: hashed with the write, in one hand-off, and not
        stored unless they are `chunk` (ChunkCorrupt); not stored, they are not checked here."""
        size = len(data)
        if not self.may_write() or not self._room_for(size):
            return False
        if not run.indexed and not self.index_task(run.meta):
            return False
        try:
            await self.store.put_piece(run.task_id, index, chunk, data, verify)
        except CannotStore as e:
            self.cannot_cache(e)
            return False
        if not self._caching:
            self._caching = True
            log.info("caching again")
        self.metrics.cache_bytes.set(self.store.bytes)
        return True

    def index_task(self, meta: TaskMeta) -> bool:
        """Record the task in the store's index; whether it holds the task with this layout."""
        if not self.may_write():
            return False
        try:
            return self.store.put_task(meta)
        except CannotStore as e:
            self.cannot_cache(e)
            return False

    def may_write(self) -> bool:
        """Whether to try writing the store now: not within FULL_BACKOFF of a failed write
        (a store that could not be opened for writing is tried again as often)."""
        if self.clock.monotonic() < self._full_until:
            return False
        if self.store.read_only is not None and not self.store.reopen():
            self.cannot_cache(CannotStore(self.store.read_only))
            return False
        return True

    def cannot_cache(self, e: CannotStore) -> None:
        """A write of the store failed: cache nothing for FULL_BACKOFF seconds and, if for want
        of space, evict. Logged once until caching works again."""
        self._full_until = self.clock.monotonic() + FULL_BACKOFF
        self._uncached(f"{'disk full' if e.full else 'cannot write the store'} ({e})")
        if e.full:
            self.evict(self.budget.full_evict_to(self.store.bytes, self._floor()))

    def _uncached(self, why: str) -> None:
        if self._caching:
            self._caching = False
            log.warning("%s: serving uncached, trying again every %d s", why, FULL_BACKOFF)

    def _floor(self) -> Floor | None:
        return Floor.of(self.store.free_space())

    def _room_for(self, size: int) -> bool:
        """Whether `size` more bytes may be cached: within --disk-quota and above the
        free-space floor, after evicting least recently used tasks if that makes room."""
        reserve = self.store.unsettled + size  # chunk writes under way count as stored
        target = self.budget.quota_evict_to(self.store.bytes, reserve)
        if target is not None:
            self.evict(target)
        if self.budget.over_quota(self.store.bytes, reserve):
            return False
        floor = self._floor()
        if floor is None or floor.room(reserve):
            return True
        self.evict(floor.evict_to(self.store.bytes, reserve))
        after = self._floor()
        if after is not None and after.room(reserve):
            return True
        self._uncached(f"disk full: {floor.free} bytes free, below the {floor.keep} kept free")
        return False

    def evict(self, target: int) -> None:
        """Drop least recently used tasks until the store holds at most `target` bytes; never
        a task being read or fetched, or opened by a client whose read has not begun yet
        (for up to OPEN_HOLD: a reader left with evicted pieces failed "kept failing" in the
        soak)."""
        now = self.clock.monotonic()
        busy = {t for t, r in self.runs.items() if r.busy or r.held(now, OPEN_HOLD)}
        try:
            dropped = self.store.evict(max(0, target), busy)
        except CannotStore as e:
            dropped = e.dropped
            self._full_until = self.clock.monotonic() + FULL_BACKOFF
            self._uncached(f"cannot evict ({e})")
        for task_id in dropped:
            self.runs.pop(task_id, None)
            self.scheduler.withdraw(task_id, None)
            log.info("evicted %s", task_id)
        self.metrics.cache_bytes.set(self.store.bytes)

    def touch(self, run: TaskRun, now: float) -> None:
        """The task becomes the most recently used (`now`: wall-clock seconds)."""
        if run.indexed and self.may_write():
            try:
                self.store.touch(run.task_id, now)
            except CannotStore as e:
                self.cannot_cache(e)

    def drop_chunk(self, chunk: str) -> None:
        """A stored chunk failed verification: forget it everywhere so it is fetched again."""
        self.metrics.verify_failures.inc()
        log.error("stored chunk %s is corrupt: dropping it", chunk)
        dropped: dict[str, list[int]] = {}
        try:
            pieces = self.store.drop_chunk(chunk)
        except CannotStore as e:  # its file is gone; the index entries go at the next start
            self.cannot_cache(e)
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

