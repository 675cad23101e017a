"""The scheduler process: the HTTP API on `--listen`, heartbeats over UDP on `--udp`, the loop
that expires silent peers and the one that samples the cluster's totals for the console's
charts (scheduler/history.py).

State lives in this process (`MemoryStore`) unless `--redis` names a Redis, or
`--redis-cluster` a seed node of a Redis Cluster, which any number of replicas then share
(`RedisStore`, the same code for both): a peer may register with one and ask another."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field

from prometheus_client import Counter

from common.config import startup
from common.metrics import restarts_counter
from common.registries import AllowList, Registry
from common.tasks import TaskSet
from common.web import ClientLimits, Server
from scheduler import history
from scheduler.api import SchedulerAPI
from scheduler.framed import FramedCalls
from scheduler.history_redis import RedisHistory
from scheduler.liveness import HeartbeatListener
from scheduler.redis_store import RedisStore
from scheduler.store import MemoryStore, Store

log = logging.getLogger("naiad.scheduler")


@dataclass
class SchedulerConfig:
    listen: str = "127.0.0.1:8002"
    udp: str | None = "127.0.0.1:8003"  # None: heartbeats over HTTP only
    udp_advertise: str | None = None  # what peers are told, if not `udp` (NAT, a proxy)
    heartbeat_interval: float = 2.0
    lease_timeout: float = 2.0
    token: str | None = None
    secret: bytes | None = None
    redis: str | None = None  # redis://host:port/db: state shared by scheduler replicas
    redis_cluster: str | None = None  # redis://host:port of a Redis Cluster node: the same
    tls: ssl.SSLContext | None = None  # HTTPS on `listen`
    allow_registries: list[Registry] = field(default_factory=list)  # what preheat may reach
    limits: ClientLimits | None = None  # per client on `listen` (None: the defaults)
    # Seconds between history samples (None: 2.5 heartbeat intervals, 5 s by default: peers
    # report their counters with each heartbeat, so a shorter one would chart the reports'
    # rhythm, not the traffic's) and samples kept (720: an hour at 5 s).
    history_interval: float | None = None
    history_samples: int = history.CAPACITY
    # Peers' hot calls over persistent framed connections on `listen` (scheduler/framed.py);
    # False answers them as a scheduler from before it did (HTTP's 400 to the preface).
    framed: bool = True


class SchedulerService:
    def __init__(self, config: SchedulerConfig, store: Store | None = None) -> None:
        self.config = config
        self._own_store = store is None
        # Supervised loops' restarts, on this scheduler's /metrics (the store's loops too).
        self.restarts = restarts_counter(None)
        self.store = store or self._make_store(config, self.restarts)
        self.id = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.history = self._make_history(config, self.store)
        self.api = SchedulerAPI(self.store, scheduler_id=self.id, token=config.token,
                                secret=config.secret,
                                allow=AllowList(config.allow_registries, owner="scheduler"),
                                history_log=self.history)
        self.framed = FramedCalls(self.api) if config.framed else None
        self.server = Server(self.api.app(), config.listen, config.tls, config.limits,
                             sniffed=self.framed)
        self.udp = HeartbeatListener(self.store, config.udp, config.secret,
                                     self.api.metrics.heartbeats) if config.udp else None
        self.api.metrics.registry.register(self.restarts)
        self._tasks = TaskSet("scheduler", self.restarts)

    @staticmethod
    def _make_store(config: SchedulerConfig, restarts: Counter) -> Store:
        if config.redis or config.redis_cluster:
            return RedisStore.from_url(config.redis_cluster or config.redis or "",
                                       cluster=bool(config.redis_cluster),
                                       heartbeat_interval=config.heartbeat_interval,
                                       lease_timeout=config.lease_timeout, restarts=restarts)
        return MemoryStore(heartbeat_interval=config.heartbeat_interval,
                           lease_timeout=config.lease_timeout)

    @staticmethod
    def _make_history(config: SchedulerConfig, store: Store) -> history.HistoryLog:
        interval = config.history_interval or \
            history.HEARTBEATS_PER_SAMPLE * config.heartbeat_interval
        if isinstance(store, RedisStore):  # shared: every replica shows the same series
            return RedisHistory.of(store, interval=interval, capacity=config.history_samples)
        return history.MemoryHistory(store.counters, interval, config.history_samples)

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        """Bind both ports and start the loops. A start that fails (a port in use: a
        ConfigError) closes what it opened first. A Redis that is down is no such failure:
        the API answers 503 where it needs the store until Redis is back."""
        async with contextlib.AsyncExitStack() as opened:
            await self._start(opened)
            opened.pop_all()  # running: stop() closes them

    async def _start(self, opened: contextlib.AsyncExitStack) -> None:
        if self._own_store:
            opened.push_async_callback(self.store.close)
        opened.push_async_callback(self.api.jobs.close)
        await self.store.start()
        opened.push_async_callback(self._tasks.close)
        if self.udp is not None:
            with startup(f"--udp {self.config.udp}"):
                await self.udp.start()
            opened.callback(self.udp.stop)
            # Told to peers as they register (an unspecified host: the one they reached).
            self.api.udp_addr = self.config.udp_advertise or self.udp.address
            self._tasks.supervise("scheduler-udp", self.udp.run)
        opened.push_async_callback(self.server.stop)
        with startup(f"--listen {self.config.listen}"):
            await self.server.start()
        self._tasks.supervise("scheduler-expiry", self._expire_loop)
        self._tasks.supervise("scheduler-history", self._history_loop)
        log.info("scheduler ready", extra={"listen": self.server.address, "id": self.id,
                                           "udp": self.api.udp_addr})

    async def stop(self) -> None:
        if self.udp is not None:
            self.udp.stop()
        await self._tasks.close()
        await self.server.stop()
        await self.api.jobs.close()
        if self._own_store:
            await self.store.close()

    async def _expire_loop(self) -> None:
        """Every half interval, drop the peers silent too long. A failure (the state store
        down) ends the loop; its supervisor restarts it with backoff."""
        interval = self.config.heartbeat_interval / 2
        while True:
            await asyncio.sleep(interval)
            gone = await self.store.expire()
            for peer_id in gone:
                log.info("peer expired", extra={"peer": peer_id})

    async def _history_loop(self) -> None:
        """A sample now (a fresh cluster's history starts at zero), then one just after each
        slot starts; over Redis the first replica in a slot takes it. A failure (the state store
        down) ends the loop; its supervisor restarts it with backoff."""
        while True:
            await self.history.sample()
            await asyncio.sleep(history.next_wake(time.time(), self.history.interval))
