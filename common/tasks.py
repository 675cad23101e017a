"""An owner for background tasks: every task it spawns is cancelled when it closes, and every
exception a task dies of is logged, never swallowed; a supervised loop (`TaskSet.supervise`) is
restarted with backoff when it fails, and each failure is counted. And `Activity`: whether some
work is under way, for the work that must only run when none is (the scrubber, draining)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

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


@dataclass
class Backoff:
    """How long to wait after a failure before trying again: `first`, doubling per failure in
    a row up to `most`; a run that lasted `healthy` seconds, or a `reset` (a success), starts
    the doubling over. Every exponential retry in naiad uses it."""

    first: float = 0.1
    most: float = 5.0
    healthy: float = 30.0
    _last: float = 0.0

    def delay(self, ran_for: float = 0.0) -> float:
        """The wait after a failure that ended a run of `ran_for` seconds."""
        if not self._last or ran_for >= self.healthy:
            self._last = self.first
        else:
            self._last = min(self.most, self._last * 2)
        return self._last

    def reset(self) -> None:
        """It worked: the next failure waits `first` again."""
        self._last = 0.0


class _Count(Protocol):
    def inc(self) -> None: ...


class RestartCounter(Protocol):
    """What counts restarts, by loop: a prometheus `Counter` with one label fits."""

    def labels(self, loop: str) -> _Count: ...


class TaskSet:
    def __init__(self, name: str, restarts: RestartCounter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.restarts = restarts
        self._clock = clock
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

    def supervise(self, name: str, loop: Callable[[], Awaitable[object]],
                  backoff: Backoff | None = None) -> asyncio.Task[None]:
        """Run `loop()` until it returns or this set closes; each time it raises, log one line,
        count it in `restarts` under `name`, wait (`backoff`) and call `loop()` again."""
        if self.restarts is not None:
            self.restarts.labels(name)  # the series exists, at 0, from the start
        return self.spawn(self._supervised(name, loop, backoff or Backoff()), name)

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[object]],
                          backoff: Backoff) -> None:
        while True:
            started = self._clock()
            try:
                await loop()
                return
            except Exception as e:  # counted, logged, restarted
                wait = backoff.delay(self._clock() - started)
                if self.restarts is not None:
                    self.restarts.labels(name).inc()
                log.warning("%s: loop %s failed (%s); restarting in %.1f s", self.name, name,
                            describe(e), wait)
                log.debug("loop %s failed", name, exc_info=e)
            await asyncio.sleep(wait)

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


def describe(e: BaseException) -> str:
    """An exception in one line: its type, and its message if it has one."""
    text = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def consume_exception(fut: asyncio.Future[Any]) -> None:
    """Done-callback marking a future's exception as seen: waiters, if any, re-raise it."""
    if not fut.cancelled():
        fut.exception()
