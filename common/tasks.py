"""An owner for background tasks: every task it spawns is cancelled when it closes, and every
exception a task dies of is logged, never swallowed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("naiad.tasks")


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
