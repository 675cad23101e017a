"""The scheduler process: the HTTP API on `--listen` and the loop that expires silent peers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from dataclasses import dataclass

from common.web import Server
from scheduler.api import SchedulerAPI
from scheduler.store import MemoryStore, Store

log = logging.getLogger("naiad.scheduler")


@dataclass
class SchedulerConfig:
    listen: str = "127.0.0.1:8002"
    udp: str = "127.0.0.1:8003"
    heartbeat_interval: float = 2.0
    lease_timeout: float = 2.0
    token: str | None = None
    secret: bytes | None = None


class SchedulerService:
    def __init__(self, config: SchedulerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or MemoryStore(heartbeat_interval=config.heartbeat_interval,
                                          lease_timeout=config.lease_timeout)
        self.id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.api = SchedulerAPI(self.store, scheduler_id=self.id, token=config.token,
                                secret=config.secret)
        self.server = Server(self.api.app(), config.listen)
        self._expiry: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        await self.server.start()
        self._expiry = asyncio.create_task(self._expire_loop(), name="scheduler-expiry")
        log.info("scheduler ready", extra={"listen": self.server.address, "id": self.id})

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await self.server.stop()

    async def _expire_loop(self) -> None:
        interval = self.config.heartbeat_interval / 2
        while True:
            await asyncio.sleep(interval)
            try:
                gone = await self.store.expire()
            except Exception:
                log.exception("peer expiry failed")
                continue
            for peer_id in gone:
                log.info("peer expired", extra={"peer": peer_id})
