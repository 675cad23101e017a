"""`naiad demo`: a whole cluster on loopback in one process (a sample registry, a scheduler,
several peers), every blob pulled through every peer at once, and what the backbone saved.

Its daemons share a secret of their own, made for the run: every internal call is signed, as in
a real cluster, and nothing is written outside the run's temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import tempfile
import time
from collections.abc import Callable

import aiohttp

from common.metrics import SOURCES
from common.pieces import MiB
from common.sizes import format_size
from naiad.sample_registry import SampleRegistry
from peer.daemon import PeerConfig, PeerDaemon
from scheduler.server import SchedulerConfig, SchedulerService

REPO = "demo/app"
MAX_PEERS = 32  # one process runs them all


def _peer_bytes(daemon: PeerDaemon, name: str, labels: dict[str, str] | None = None) -> int:
    return int(daemon.metrics.registry.get_sample_value(name, labels or {}) or 0)


async def _pull(session: aiohttp.ClientSession, daemon: PeerDaemon,
                digest: str) -> tuple[bool, str, float]:
    started = time.monotonic()
    hasher = hashlib.sha256()
    async with session.get(f"{daemon.mirror_url}/v2/{REPO}/blobs/{digest}") as resp:
        if resp.status != 200:
            return False, f"HTTP {resp.status}", time.monotonic() - started
        async for chunk in resp.content.iter_chunked(1 << 20):
            hasher.update(chunk)
        source = resp.headers.get("X-Naiad-Source", "?")
    ok = "sha256:" + hasher.hexdigest() == digest
    return ok, source, time.monotonic() - started


async def run_demo(peers: int = 4, sizes: tuple[int, ...] = (8 * MiB, 24 * MiB),
                   out: Callable[[str], None] = print) -> int:
    # Whatever starts is stopped, last first, however far the start got.
    async with contextlib.AsyncExitStack() as running:
        workdir = running.enter_context(tempfile.TemporaryDirectory(prefix="naiad-demo-"))
        registry = SampleRegistry()
        digests = [registry.add(os.urandom(size)) for size in sizes]
        await registry.start()
        running.push_async_callback(registry.stop)
        secret = secrets.token_hex(32).encode()
        scheduler = SchedulerService(SchedulerConfig(listen="127.0.0.1:0", udp="127.0.0.1:0",
                                                     heartbeat_interval=1.0, secret=secret))
        await scheduler.start()
        running.push_async_callback(scheduler.stop)
        daemons = [PeerDaemon(PeerConfig(
            data_dir=os.path.join(workdir, f"peer-{i}"), schedulers=[scheduler.url],
            listen="127.0.0.1:0", upload="127.0.0.1:0", registry=registry.url,
            peer_id=f"demo-peer-{i}", secret=secret)) for i in range(1, peers + 1)]
        for d in daemons:
            await d.start()
            running.push_async_callback(d.stop)
        await asyncio.wait_for(
            asyncio.gather(*(d.scheduler.connected.wait() for d in daemons)), 10)
        out(f"naiad demo: a scheduler at {scheduler.url}, {peers} peers, a registry at "
            f"{registry.url} with {len(digests)} blobs "
            f"({', '.join(format_size(s) for s in sizes)})")
        ok = True
        async with aiohttp.ClientSession() as session:
            for digest, size in zip(digests, sizes, strict=True):
                results = await asyncio.gather(*(_pull(session, d, digest)
                                                  for d in daemons))
                good = all(r[0] for r in results)
                ok &= good
                out(f"  pulled {digest[:19]}… ({format_size(size)}) through {peers} peers "
                    f"at once: {'sha256 ok' if good else 'FAILED'}, "
                    f"slowest {max(r[2] for r in results):.2f} s, "
                    f"sources {', '.join(r[1] for r in results)}")
        out("")
        out(f"  {'peer':<12} {'from origin':>12} {'from peers':>12} {'from store':>12} "
            f"{'served':>12}")
        served_total = 0
        for d in daemons:
            by = {s: _peer_bytes(d, "naiad_peer_download_bytes_total", {"source": s})
                  for s in SOURCES}
            served = _peer_bytes(d, "naiad_peer_served_bytes_total")
            served_total += served
            out(f"  {d.config.peer_id:<12} {format_size(by['origin']):>12} "
                f"{format_size(by['peer']):>12} {format_size(by['local']):>12} "
                f"{format_size(served):>12}")
        origin = registry.bytes_sent
        saving = 1 - origin / served_total if served_total else 0.0
        out("")
        out(f"  the registry sent {format_size(origin)} for {format_size(served_total)} "
            f"delivered to clients: {origin / sum(sizes):.2f}x the blobs instead of "
            f"{peers}x; backbone saving {100 * saving:.1f}%")
        return 0 if ok and saving > 0 else 1
