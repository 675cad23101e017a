"""A seed peer's preheat work: ask the scheduler what to hold, fetch it whole into the store
(through the engine, so the cluster's origin discipline applies), a few blobs at a time.

Work only ever names registries on this peer's allow-list: a preheat job cannot point a seed
at an address its operator did not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from common.limits import BACKGROUND
from common.models import WorkItem
from common.ranges import ByteRange
from common.tasks import TaskSet
from peer.engine import Engine
from peer.mirror import AccessCache
from peer.origin import OriginError, OriginRequest
from peer.scheduler_client import SchedulerClient, SchedulerRefused, SchedulerUnavailable
from peer.upstream import AllowList, Registry, UpstreamRefused

log = logging.getLogger("naiad.peer.seed")
CONCURRENT = 2


class Seeder:
    def __init__(self, scheduler: SchedulerClient, engine: Engine, access: AccessCache,
                 allow: AllowList) -> None:
        self.scheduler = scheduler
        self.engine = engine
        self.access = access
        self.allow = allow
        self.active: set[str] = set()
        self.done: set[str] = set()
        self.refused: set[str] = set()
        self._slots = asyncio.Semaphore(CONCURRENT)
        self._tasks = TaskSet("seed")

    async def run(self) -> None:
        """Ask for work every heartbeat interval; the fetches outlive a restart of this loop
        (they belong to this seeder until `close`)."""
        while True:
            await self.scheduler.connected.wait()
            try:
                items = await self.scheduler.work()
            except (SchedulerUnavailable, SchedulerRefused) as e:
                log.debug("no preheat work: %s", e)
                items = []
            for item in items:
                if item.task_id not in self.active | self.refused:
                    self.active.add(item.task_id)
                    self._tasks.spawn(self._fetch(item), f"seed-{item.task_id[:19]}")
            await asyncio.sleep(self.scheduler.interval)

    async def close(self) -> None:
        await self._tasks.close()

    async def _fetch(self, item: WorkItem) -> None:
        try:
            async with self._slots:
                await self._hold(item)
        except (OriginError, UpstreamRefused, OSError, ValueError) as e:
            log.warning("preheat of %s failed: %s", item.url, e)
        finally:
            self.active.discard(item.task_id)

    async def _hold(self, item: WorkItem) -> None:
        try:
            registry = self.allow.check(Registry.parse(item.registry))
        except UpstreamRefused as e:
            self.refused.add(item.task_id)
            log.error("preheat job %s names %s: %s", item.job, item.registry, e)
            return
        req = OriginRequest(url=item.url, registry=registry.base)
        probe = await self.access.probe(req, item.url)
        if not probe.ok or probe.length is None:
            raise OriginError(f"{item.url} answered {probe.status}")
        digest = item.task_id if item.task_id == item.digest else None
        run = await self.engine.open(item.task_id, probe.length, digest, req)
        if probe.length and not run.complete:
            whole = ByteRange(0, probe.length - 1)
            async with contextlib.aclosing(self.engine.read(run, whole, item.digest,
                                                            BACKGROUND)) as views:
                async for _ in views:
                    pass
        self.done.add(item.task_id)
        log.info("preheated %s", item.url)
