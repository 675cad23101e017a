"""An owner for background tasks: every task it spawns is cancelled when it closes, and every
exception a task dies of is logged, never swallowed. And `Activity`: whether some work is under
way, for the work that must only run when none is (the scrubber, draining)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("naiad.tasks")


class Activity:
    """Busy or idle, and for how long idle: a peer that goes idle between two pieces for a
    moment is not idle in the sense that background work may take the CPU. `clock` is
    monotonic seconds (a test's own clock drives the quiet time)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle = asyncio.Event()
        self.idle.set()
        self._clock = clock
        self._idle_since = clock()

    def set_busy(self, busy: bool) -> None:
        if busy:
            self.idle.clear()
        elif not self.idle.is_set():
            self.idle.set()
            self._idle_since = self._clock()

    def quiet_for(self) -> float:
        """Seconds since the work ended; 0 while there is work."""
        return self._clock() - self._idle_since if self.idle.is_set() else 0.0


class TaskSet:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name} is closed")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s of %s failed", task.get_name(), self.name,
                      exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            # Some libraries turn a cancellation into another exception and carry on; cancel
            # again until the task really ends.
            while not task.done():
                await asyncio.wait([task], timeout=0.1)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def consume_exception(fut: asyncio.Future[Any]) -> None:
    """Done-callback marking a future's exception as seen: waiters, if any, re-raise it."""
    if not fut.cancelled():
        fut.exception()
