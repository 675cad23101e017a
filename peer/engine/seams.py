"""What the engine needs from the world, as Protocols: the scheduler (deciding, and told what
this peer holds), a chunk source (parents), an origin source, a clock and a random source.

The daemon plugs in the real parts (peer/scheduler_client.py, peer/parents.py, peer/origin.py,
`SystemClock`, `random`); unit tests plug in-process fakes, the way httpx tests plug a
MockTransport. The store stays the real ChunkStore: on a temporary directory it is fast.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from common.limits import DEFAULT
from common.models import Decision, TaskMeta, TaskRequest
from peer.origin import OriginRequest


class Decider(Protocol):
    """Who decides where a piece comes from (peer/scheduler_client.py SchedulerClient)."""

    async def schedule(self, task_id: str, pieces: list[int], exclude: set[str],
                       wait_ms: int, registry: str | None = None,
                       part: Callable[[list[Decision]], None] | None = None
                       ) -> list[Decision]:
        """`part`: where decisions come while the call long-polls, if the scheduler answers
        in parts; the answer is the rest."""
        ...

    def report(self, parent_id: str, task_id: str, piece: int | None, kind: str) -> None: ...

    async def wait_back(self, seconds: float) -> bool:
        """Wait up to `seconds` for a scheduler lost moments ago; whether one answers."""
        ...

    def recently_lost(self) -> bool: ...


class Scheduler(Decider, Protocol):
    """The decider, plus what it is told: a task's layout, what this peer holds, lease
    progress and seals (fire and forget: the client queues them)."""

    async def ensure_task(self, req: TaskRequest) -> TaskMeta: ...

    def announce(self, task_id: str, index: int, chunk: str,
                 registry: str | None = None, source: str = "origin") -> None:
        """This peer holds the piece now, fetched from `source` ("origin" or "peer"): a
        copy from a peer may wait longer for a schedule call to carry its claim."""
        ...

    def withdraw(self, task_id: str, pieces: list[int] | None) -> None: ...

    def blob_mismatch(self, task_id: str, registry: str | None = None) -> None: ...

    def progress(self, task_id: str, epoch: int) -> None: ...

    def longest_silence(self, since: float) -> float:
        """The longest time since `since` (monotonic) the scheduler answered nothing."""
        ...

    def sealed(self, task_id: str, registry: str | None = None) -> None: ...


class ChunkSource(Protocol):
    """A chunk's bytes from a parent (peer/parents.py ParentClient): exactly `size` bytes, not
    yet verified, or `ParentError` with its kind (busy, slow, failed, corrupt). `priority` is
    the piece's (common/limits.py scale): a parent answers urgent requests first."""

    async def fetch(self, addr: str, chunk: str, size: int,
                    priority: int = DEFAULT) -> bytes: ...


class ByteStream(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class OriginSource(Protocol):
    """Bytes start..end (inclusive) of a blob from its registry (peer/origin.py OriginClient),
    or `OriginError`."""

    def open_range(self, req: OriginRequest, start: int, end: int,
                   priority: int = DEFAULT) -> AbstractAsyncContextManager[ByteStream]: ...


class Clock(Protocol):
    """Monotonic seconds, and sleeping on them (a test's clock jumps instead)."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RandomSource(Protocol):
    """Jitter (random.Random fits)."""

    def uniform(self, a: float, b: float) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
