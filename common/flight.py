"""Single flight: concurrent requests for the same key share one call.

The first caller for a key runs the call; callers that come while it runs wait for its outcome
(its value, or its exception) instead of starting a second one. Once the call ends the key is
free again: nothing is cached here. A waiter that is cancelled leaves the call alone (its
outcome is shielded); a first caller that is cancelled cancels the call, and its waiters get
CancelledError too rather than waiting forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from common.tasks import consume_exception

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Future[V]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """`call()`'s outcome, shared with every caller for `key` while it runs."""
        pending = self._calls.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(consume_exception)
        self._calls[key] = fut
        try:
            value = await call()
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            del self._calls[key]
