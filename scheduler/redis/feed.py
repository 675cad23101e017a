"""The change feed: Redis pub/sub wake-ups for the long polls of this replica.

A write that can unblock waiters publishes on its task's channel (a peer leaving, on a
broadcast channel); the message names the pieces an announcement added, so only the polls
asking for one of them re-decide (as in the memory store). Each replica has one subscriber
connection, subscribed to the channels of the tasks it has long polls on, so a replica hears
only of what it waits for, and a long poll that starts waiting subscribes, waits for Redis to
confirm, then decides again, so a change in between is not missed. Pub/sub delivers at most
once: a lost message (a dropped connection) costs at most `RECHECK_SECONDS`, the long polls'
periodic re-decision.

On a Redis Cluster, writes PUBLISH (not SPUBLISH): the cluster passes every message to every
node, so the one subscriber, on any node, hears every slot's changes; when its node fails it
subscribes again on the next node (the supervisor's backoff), and the re-decision covers what
it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from scheduler.store import Waiters

log = logging.getLogger("naiad.scheduler.redis")

ALL = "*"  # wake-up payload: every waiter re-decides (a peer left: its leases are free)


def message(origin: str, task_id: str, pieces: Iterable[int] | None) -> str:
    """`origin task [i,j,...]`: no pieces: every poll on the task re-decides."""
    out = f"{origin} {task_id}"
    return out if pieces is None else out + " " + ",".join(map(str, pieces))


class ChangeFeed:
    def __init__(self, client: Any, channel: str, origin: str, waiters: Waiters,
                 subscriber: Callable[[int], Awaitable[aioredis.Redis]] | None) -> None:
        self.client = client
        self.channel = channel  # broadcasts; a task's changes go to channel:task
        self.origin = origin  # this replica's messages: already acted on here
        self.waiters = waiters
        self.subscribed = asyncio.Event()
        self._subscriber = subscriber  # a cluster: a plain client to its n-th node
        self._attempt = 0
        self._pubsub: Any = None  # the listener's, while connected
        self._watched: dict[str, tuple[int, asyncio.Event]] = {}  # task -> (waiters, confirmed)

    def task_channel(self, task_id: str) -> str:
        return f"{self.channel}:{task_id}"

    def channel_of(self, task_id: str) -> str:
        return self.channel if task_id == ALL else self.task_channel(task_id)

    def wake(self, task_id: str, pieces: Iterable[int] | None = None) -> None:
        if task_id == ALL:
            self.waiters.notify_all()
        else:
            self.waiters.notify(task_id, pieces)

    async def watch(self, task_id: str) -> None:
        """Hear of this task's changes from now on: subscribe to its channel, and return once
        Redis confirmed (or after a second: the periodic re-decision covers a late one)."""
        users, confirmed = self._watched.get(task_id, (0, None))
        if confirmed is None:
            confirmed = asyncio.Event()
            if self._pubsub is not None:
                try:
                    await self._pubsub.subscribe(self.task_channel(task_id))
                except (RedisError, OSError) as e:
                    log.warning("cannot subscribe to changes of %s: %s: %s", task_id,
                                type(e).__name__, e)
            users, _ = self._watched.get(task_id, (0, None))  # others may have come meanwhile
        self._watched[task_id] = (users + 1, confirmed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(confirmed.wait(), 1.0)

    def unwatch(self, task_id: str, spawn: Callable[..., Any]) -> None:
        users, confirmed = self._watched.get(task_id, (0, None))
        if users > 1:
            self._watched[task_id] = (users - 1, confirmed)
            return
        self._watched.pop(task_id, None)
        if self._pubsub is not None:
            spawn(self._pubsub.unsubscribe(self.task_channel(task_id)), "redis-unsubscribe")

    async def listen(self) -> None:
        """One subscriber per replica: the broadcast channel, and the channels of the tasks
        this replica has long polls on. Runs until the feed is lost (Redis down or restarted,
        a cluster node failed): then it raises, and its supervisor subscribes again with
        backoff."""
        prefix = self.channel + ":"
        own = None
        if self._subscriber is not None:
            self._attempt += 1
            own = await self._subscriber(self._attempt - 1)
        pubsub = (own or self.client).pubsub()
        try:
            await pubsub.subscribe(self.channel, *map(self.task_channel, self._watched))
            self._pubsub = pubsub
            async for msg in pubsub.listen():
                kind, channel = msg["type"], msg["channel"]
                if kind == "subscribe" and channel == self.channel:
                    self.subscribed.set()
                    self.waiters.notify_all()  # changes may have gone unheard till now
                elif kind == "subscribe":
                    watched = self._watched.get(channel.removeprefix(prefix))
                    if watched is not None:
                        watched[1].set()
                elif kind == "message":
                    origin, _, rest = msg["data"].partition(" ")
                    if origin != self.origin:
                        task_id, _, pieces = rest.partition(" ")
                        self.wake(task_id, [int(i) for i in pieces.split(",")]
                                  if pieces else None)
            raise ConnectionError("the redis change feed ended")
        finally:
            self._pubsub = None
            self.subscribed.clear()
            try:
                await pubsub.aclose()
                if own is not None:
                    await own.aclose()
            except (RedisError, OSError) as e:
                log.debug("closing the change feed: %r", e)
