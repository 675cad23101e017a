"""Concurrency limits that serve the most urgent first.

`PrioritySlots` is a semaphore whose waiters are admitted by priority (higher first), then in
arrival order: nydusd's on-demand reads (priority 6) overtake its prefetch (3) and the peer's
own background prefetch (1) for parent and origin connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator

ON_DEMAND = 6  # nydusd: X-Dragonfly-Priority for a read a container is blocked on
PREFETCH = 3  # nydusd: its own prefetch
DEFAULT = 4  # a client that names no priority (containerd, docker, skopeo pulls)
BACKGROUND = 1  # the peer's own prefetch of the rest of a blob


def parse_priority(header: str | None) -> int:
    """`X-Dragonfly-Priority` (0..6, Dragonfly's scale); anything else is the default."""
    value = (header or "").strip()
    return int(value) if value in ("0", "1", "2", "3", "4", "5", "6") else DEFAULT


class PrioritySlots:
    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("need at least one slot")
        self.slots = slots
        self.busy = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def _wake(self) -> None:
        while self.busy < self.slots and self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                self.busy += 1
                fut.set_result(None)

    async def acquire(self, priority: int) -> None:
        if self.busy < self.slots and not self._waiters:
            self.busy += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # admitted just as we were cancelled: give the slot back
            raise

    def release(self) -> None:
        self.busy -= 1
        self._wake()

    @contextlib.asynccontextmanager
    async def hold(self, priority: int) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
