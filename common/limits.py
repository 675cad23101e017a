"""Concurrency limits that serve the most urgent first, and bounds on what one client holds.

`PrioritySlots` is a semaphore whose waiters are admitted by priority (higher first), then in
arrival order: nydusd's on-demand reads (priority 6) overtake its prefetch (3) and the peer's
own background prefetch (1) for parent and origin connections; `waited` says how long urgent
work has queued there (capacity exhausted: the mirror answers 429 rather than wait).
`PerAddress` counts what each remote address holds against a cap; `Throttle` keeps a repeated
log line to one per interval; `raise_open_files_limit` lifts the soft descriptor limit to the
hard one at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

log = logging.getLogger("naiad.limits")
ON_DEMAND = 6  # nydusd: X-Dragonfly-Priority for a read a container is blocked on
PREFETCH = 3  # nydusd: its own prefetch
DEFAULT = 4  # a client that names no priority (containerd, docker, skopeo pulls)
BACKGROUND = 1  # the peer's own prefetch of the rest of a blob
# DESIGN: how long an on-demand read waits for anything (a lease holder, a connection, its first
# bytes) before the peer does something else about it; nydusd's own read timeout is 5 s.
ON_DEMAND_PATIENCE = 1.0


def parse_priority(header: str | None) -> int:
    """`X-Dragonfly-Priority` (0..6, Dragonfly's scale); anything else is the default."""
    value = (header or "").strip()
    return int(value) if value in ("0", "1", "2", "3", "4", "5", "6") else DEFAULT


class PrioritySlots:
    def __init__(self, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        if slots < 1:
            raise ValueError("need at least one slot")
        self.slots = slots
        self.busy = 0
        self._clock = clock
        # (-priority, arrival, queued at, admission): the heap orders by the first two only
        self._waiters: list[tuple[int, int, float, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def waited(self, priority: int) -> float:
        """How long the longest waiter of at least `priority` has been queued (0.0: none is):
        how far the slots are behind for work that urgent."""
        now = self._clock()
        return max((now - since for p, _, since, fut in self._waiters
                    if -p >= priority and not fut.done()), default=0.0)

    def _wake(self) -> None:
        while self.busy < self.slots and self._waiters:
            _, _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                self.busy += 1
                fut.set_result(None)

    def try_acquire(self, priority: int) -> bool:
        """Take a slot now if one is free and nobody waits, acquire's rule for admission at
        once (whatever `priority`: a slot freed while others wait is theirs); False: the caller
        would have to queue."""
        if self.busy < self.slots and not self._waiters:
            self.busy += 1
            return True
        return False

    async def acquire(self, priority: int) -> None:
        if self.try_acquire(priority):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._seq), self._clock(), fut))
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


class TokenBucket:
    """Bytes per second with a burst of one second: `await take(n)` returns when n bytes may
    go. One small bucket used wherever a rate is limited (scrubbing, links), not sprinkled
    sleeps."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._at = clock()

    def delay(self, n: int) -> float:
        """Take n bytes now; how long to wait before they may go (pure bookkeeping)."""
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def take(self, n: int) -> None:
        wait = self.delay(n)
        if wait > 0:
            await asyncio.sleep(wait)


class Readable(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Paced:
    """A stream whose reads are paced by a token bucket (None: not paced). Reading slower than
    the sender sends lets TCP's flow control slow the sender: the link itself is limited."""

    def __init__(self, stream: Readable, bucket: TokenBucket | None) -> None:
        self.stream = stream
        self.bucket = bucket

    async def read(self, n: int = -1) -> bytes:
        data = await self.stream.read(n)
        if self.bucket is not None and data:
            await self.bucket.take(len(data))
        return data


def bucket(rate: int | None) -> TokenBucket | None:
    """A bucket for a `--*-rate` option (None or 0: unlimited)."""
    return TokenBucket(rate) if rate else None


class PerAddress:
    """How many of something (connections) each remote address holds, against a cap."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("the cap must be at least 1")
        self.cap = cap
        self.held: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        n = self.held.get(address, 0)
        if n >= self.cap:
            return False
        self.held[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self.held.get(address, 0) - 1
        if n > 0:
            self.held[address] = n
        else:
            self.held.pop(address, None)


class Throttle:
    """At most one event per `interval` seconds: `ready()` answers None while an event would
    be too soon (counting it), else how many were dropped since the last one that went."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._dropped = 0

    def ready(self) -> int | None:
        now = self._clock()
        if now < self._next:
            self._dropped += 1
            return None
        self._next = now + self.interval
        dropped, self._dropped = self._dropped, 0
        return dropped


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_open_files_limit() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE raised to the hard one (a socket per client, parent and
    registry connection; the usual soft default of 1024 is a few hundred slow clients). The
    limits after the attempt."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)
