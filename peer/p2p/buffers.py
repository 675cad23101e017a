"""Receive buffers for whole pieces, reused once nothing refers to them any more.

A fresh `bytearray` of a 1 MiB piece is zero-filled and, in a peer whose allocator has just
handed such blocks back to the kernel, page-faulted in afresh (first touch ~4 us a page on
the lab VM): `bytearray(frame.length)` alone was 18 % of the receiving peer's event-loop
samples in `bench/profile_p2p.py --py-spy`. A reused buffer costs neither.

When a buffer is free is told by CPython's reference count: whoever still uses a piece's bytes
(the engine, a reader's read-ahead, a worker thread writing or hashing them, a memoryview
yielded to the mirror, a transport's queue) holds a reference, a buffer export included; a
buffer whose only reference is this pool's is free. A buffer is only ever handed out to be
filled whole before anyone sees it (peer/p2p/client.py): its stale bytes are never read.
"""

from __future__ import annotations

import sys

POOLED_MIN = 256 << 10  # smaller buffers come cheaply from the heap
POOL_BYTES = 64 << 20  # a read-ahead's pieces in flight (peer/engine/reader.py: <= 64 MiB)
# getrefcount of a pooled buffer nobody else holds: the pool's list, the loop variable, the
# call's argument.
_FREE = 3


class Buffers:
    """Buffers of exact sizes, at most `limit` bytes of them pooled (beyond it, and below
    POOLED_MIN, a fresh bytearray each time, as before)."""

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self.pooled = 0  # bytes of the buffers in the pool, in use or free
        self._all: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        """A buffer of `size` bytes for the caller alone; its contents are undefined."""
        if size < POOLED_MIN:
            return bytearray(size)
        free = self._free(size)
        if free is not None:
            return free
        if self.pooled + size > self.limit:
            self.release(self.pooled + size - self.limit)
        buffer = bytearray(size)
        if self.pooled + size <= self.limit:
            self._all.append(buffer)
            self.pooled += size
        return buffer

    def _free(self, size: int) -> bytearray | None:
        # A function of its own: a loop variable left bound in the caller would count as a
        # reference to the last buffer looked at.
        for buffer in self._all:
            if len(buffer) == size and sys.getrefcount(buffer) == _FREE:
                return buffer
        return None

    def release(self, need: int | None = None) -> int:
        """Let go of free buffers, at least `need` bytes of them if there are (None: all);
        the bytes let go."""
        kept: list[bytearray] = []
        freed = 0
        for buffer in self._all:
            if (need is None or freed < need) and sys.getrefcount(buffer) == _FREE:
                freed += len(buffer)
            else:
                kept.append(buffer)
        self._all = kept
        self.pooled -= freed
        return freed

    def free_bytes(self) -> int:
        """Bytes of pooled buffers nobody uses now."""
        return sum(len(b) for b in self._all if sys.getrefcount(b) == _FREE)
