"""The peer daemon: wires store, engine, scheduler client, upload server and mirror together, and
owns their lifecycle (start, drain, stop)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import socket
import ssl
import time
from dataclasses import dataclass, field

import aiohttp

from common import memory
from common.config import startup, writable_dir
from common.limits import bucket
from common.metrics import SOURCES, PeerMetrics
from common.models import Heartbeat, PeerCounters, PeerLoad, PeerRegistration
from common.tasks import TaskSet
from common.web import ClientLimits, Server, split_listen
from peer.engine import Engine
from peer.mirror import AccessCache, Mirror
from peer.origin import OriginClient
from peer.p2p import frames
from peer.p2p.client import FramedClient
from peer.p2p.server import FramedEndpoint
from peer.parents import ParentClient
from peer.scheduler_client import SchedulerClient
from peer.scrub import Scrubber
from peer.seed import Seeder
from peer.store import ChunkStore
from peer.upload import MIN_RATE, UploadServer
from peer.upstream import AllowList, Registry

log = logging.getLogger("naiad.peer")


@dataclass
class PeerConfig:
    data_dir: str
    schedulers: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8002"])
    listen: str = "127.0.0.1:65001"
    upload: str = "127.0.0.1:65002"
    registry: str = "https://registry-1.docker.io"
    hub: str = "https://huggingface.co"  # model hub behind HF_ENDPOINT=<this peer>
    allow_registries: list[str] = field(default_factory=list)
    peer_id: str = field(default_factory=socket.gethostname)
    idc: str = ""
    location: str = ""
    seed: bool = False
    advertise: str | None = None
    piece_size: int | None = None
    upload_slots: int = 8
    upload_slots_per_address: int | None = None  # None: half of upload_slots, at least 1
    upload_min_rate: int | None = MIN_RATE  # bytes/s a child must read at; None or 0: no minimum
    origin_concurrency: int = 4
    verify_on_serve: bool = True
    prefetch: bool = True
    disk_quota: int | None = None
    scrub_rate: int = 16 << 20  # bytes/s; 0 turns the scrubber off
    tls: ssl.SSLContext | None = None  # HTTPS on the mirror port
    # TLS on the upload port (registered as https://host:port); it may require client
    # certificates (--tls-ca), unlike the mirror, whose clients are container runtimes.
    upload_tls: ssl.SSLContext | None = None
    peer_tls: ssl.SSLContext | None = None  # dialling https parents: trust and client cert
    upload_rate: int | None = None  # bytes/s to other peers; None: unlimited
    download_rate: int | None = None  # bytes/s from other peers
    origin_rate: int | None = None  # bytes/s from origins
    secret: bytes | None = None
    limits: ClientLimits | None = None  # per client on both ports (None: the defaults)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class PeerDaemon:
    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.metrics = PeerMetrics()
        self.store = ChunkStore(config.data_dir)
        self.started_at = time.time()
        default = Registry.parse(config.registry)
        self.hub = Registry.parse(config.hub)  # on the allow-list by being named
        allowed = [default, self.hub] + [Registry.parse(u) for u in config.allow_registries]
        self.allow = AllowList(allowed)
        self.default_registry = default
        self._tasks = TaskSet("peer", self.metrics.restarts)  # loops supervised, restarts counted
        self.seeder: Seeder | None = None
        # Built in start(): they need the running loop.
        self.engine: Engine
        self.scheduler: SchedulerClient
        self.upload: UploadServer
        self.mirror_server: Server
        self.upload_server: Server

    async def start(self) -> None:
        """Open the store, bind both ports, start the loops. A start that fails (a port in use,
        a data directory it cannot write: a ConfigError) closes what it opened first."""
        async with contextlib.AsyncExitStack() as opened:
            await self._start(opened)
            opened.pop_all()  # running: stop() closes them

    async def _start(self, opened: contextlib.AsyncExitStack) -> None:
        c = self.config
        with startup(f"--data-dir {self.store.root}"):
            writable_dir(self.store.root)
            self.store.open()
        opened.callback(self.store.close)
        memory.one_arena()  # before any worker thread allocates (common/memory.py)
        opened.callback(memory.install(asyncio.get_running_loop(), log))  # off by default
        self._origin_session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=60))
        opened.push_async_callback(self._origin_session.close)
        self._peer_session = aiohttp.ClientSession(  # chunks may arrive zstd: peer/wire.py
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=512, ttl_dns_cache=60))
        opened.push_async_callback(self._peer_session.close)
        self.upload = UploadServer(self.store, self.metrics, c.upload_slots, c.secret,
                                   rate=bucket(c.upload_rate),
                                   per_address=c.upload_slots_per_address,
                                   min_rate=c.upload_min_rate)
        # One port, two transports: HTTP, and the framed one for peers that open with its
        # preface (peer/p2p/).
        self.upload_server = Server(self.upload.app(), c.upload, c.upload_tls, c.limits,
                                    sniffed=FramedEndpoint(self.upload, c.limits))
        opened.push_async_callback(self.upload_server.stop)
        with startup(f"--upload {c.upload}"):
            await self.upload_server.start()
        with startup("cannot find this host's address for other peers (set --advertise)"):
            advertised = self._advertised()
        registration = PeerRegistration(
            id=c.peer_id, upload_addr=advertised, idc=c.idc, location=c.location,
            upload_slots=c.upload_slots, seed=c.seed, started_at=self.started_at,
            transport=frames.VERSION)
        self.scheduler = SchedulerClient(c.schedulers, registration, self._peer_session,
                                         self.store, self._heartbeat, c.secret,
                                         restarts=self.metrics.restarts)
        origin = OriginClient(self._origin_session, c.origin_concurrency,
                              allowed=self.allow.__contains__, rate=bucket(c.origin_rate))
        download_rate = bucket(c.download_rate)  # one bucket, whichever the transport
        self._framed = FramedClient(c.secret, rate=download_rate, tls=c.peer_tls)
        opened.callback(self._framed.close)
        self.engine = Engine(
            peer_id=c.peer_id, store=self.store, scheduler=self.scheduler, origin=origin,
            parents=ParentClient(self._peer_session, c.secret, rate=download_rate,
                                 tls=c.peer_tls, framed=self._framed,
                                 patience=self._framed.patience),
            metrics=self.metrics,
            verify_on_serve=c.verify_on_serve, piece_size=c.piece_size, prefetch=c.prefetch,
            disk_quota=c.disk_quota, idc=c.idc)
        opened.push_async_callback(self.engine.close)
        # Registry answers shared through the scheduler when there is a cluster secret.
        access = AccessCache(origin, shared=self.scheduler, secret=c.secret)
        mirror = Mirror(engine=self.engine, origin=origin, access=access,
                        session=self._origin_session, allow=self.allow,
                        default=self.default_registry, metrics=self.metrics, hub=self.hub)
        self.mirror = mirror
        self.mirror_server = Server(mirror.app(), c.listen, c.tls, c.limits)
        opened.push_async_callback(self.mirror_server.stop)
        with startup(f"--listen {c.listen}"):
            await self.mirror_server.start()
        await self.scheduler.start()
        opened.push_async_callback(self.scheduler.stop, leave=False)
        opened.push_async_callback(self._tasks.close)
        self.metrics.cache_bytes.set(self.store.cache_bytes())
        self._tasks.supervise("peer-gauges", self._gauges)
        self._tasks.supervise("peer-malloc-trim", memory.Trimmer(
            [self.engine.activity, self.upload.activity]).run)  # when quiet: common/memory.py
        if c.seed:
            self.seeder = Seeder(self.scheduler, self.engine, access, self.allow)
            self._tasks.supervise("peer-seeder", self.seeder.run)
        if c.scrub_rate > 0:
            self.scrubber = Scrubber(self.store, self.engine, c.scrub_rate,
                                     [self.engine.activity, self.upload.activity])
            self._tasks.supervise("peer-scrubber", self.scrubber.run)
        log.info("peer %s ready: mirror %s, upload %s (advertised %s)", c.peer_id,
                 self.mirror_server.address, self.upload_server.address,
                 registration.upload_addr)

    def _advertised(self) -> str:
        """The upload address registered for other peers to dial; `https://` says it is TLS."""
        scheme = "https://" if self.config.upload_tls else ""
        if self.config.advertise:
            return scheme + self.config.advertise.removeprefix("https://")
        host, port = split_listen(self.upload_server.address)
        if _unspecified(host):
            host = socket.gethostbyname(socket.gethostname())
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}{host}:{self.upload_server.port or port}"

    def _heartbeat(self) -> Heartbeat:
        r = self.metrics.registry

        def counter(name: str, labels: dict[str, str] | None = None) -> int:
            return int(r.get_sample_value(name, labels or {}) or 0)

        by_source = {s: counter("naiad_peer_download_bytes_total", {"source": s})
                     for s in SOURCES}
        return Heartbeat(
            load=PeerLoad(active_uploads=self.upload.active,
                          free_disk=shutil.disk_usage(self.store.root).free),
            counters=PeerCounters(served=counter("naiad_peer_served_bytes_total"),
                                  uploaded=counter("naiad_peer_upload_bytes_total"),
                                  started_at=self.started_at, **by_source))

    async def _gauges(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.metrics.cache_bytes.set(self.store.bytes)

    async def stop(self, drain: float = 0.0) -> None:
        """Within `drain` seconds: refuse new client requests and let those under way finish
        (still registered, so they go on peer-to-peer), then leave the scheduler (no new
        children) and let uploads in flight finish; then close everything."""
        deadline = time.monotonic() + drain
        await self.mirror.drain(drain)
        await self.scheduler.stop(leave=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.upload.activity.idle.wait(),
                                   max(0.0, deadline - time.monotonic()))
        await self._tasks.close()
        if self.seeder is not None:
            await self.seeder.close()
        await self.mirror_server.stop()
        await self.upload_server.stop()
        await self.engine.close()
        self._framed.close()
        await self._origin_session.close()
        await self._peer_session.close()
        self.store.close()

    @property
    def mirror_url(self) -> str:
        return self.mirror_server.url
