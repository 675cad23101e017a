"""The registry's load per layer (issue 14, Dragonfly #3783): HEAD and GET requests a registry
receives when N real peer processes pull one layer, anonymously or with one shared credential.

A real docker-registry (htpasswd Basic auth for `--credential`) sits behind `RegistryCounter`, a
small HTTP front that counts blob HEADs and GETs; one scheduler and N peers (`naiad` processes)
use it as their registry. Each round every peer's client pulls the whole blob at once (sha256
checked); rounds are `--interval` seconds apart, longer than the 60 s access TTL, so the second
round shows what keeping the answers fresh costs: HEADs per minute at steady demand.

    python -m bench.registry_load --peers 20 --size 8MiB [--credential] [--rounds 2]

Its last line: `registry peers=N auth=anonymous|shared heads=H1,H2 gets=G1,G2 heads/min=X`.
Other code (bench.fleet's report) calls `measure(peers, ...)`, which returns the same as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.sizes import parse_size
from tests.cluster import Cluster, Registry, free_port, push_blob, serve
from tests.registry_auth import basic, htpasswd_yaml, write_htpasswd

MiB = 1 << 20
START_BATCH = 10  # peers started at once
_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


class RegistryCounter:
    """An HTTP front for a registry that counts what reaches it: `requests[(method, kind)]`,
    kind `blob` for `/v2/<repo>/blobs/<digest>`, else `other`. Bodies are streamed."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: Counter[tuple[str, str]] = Counter()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def heads(self) -> int:
        return self.requests["HEAD", "blob"]

    @property
    def gets(self) -> int:
        return self.requests["GET", "blob"]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        parts = request.path.split("/")
        blob = len(parts) >= 5 and parts[1] == "v2" and parts[-2] == "blobs"
        self.requests[request.method, "blob" if blob else "other"] += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        body = await request.read()
        async with self._session.request(request.method, self.target + request.rel_url.raw_path_qs,
                                         headers=headers, data=body or None,
                                         allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    resp.headers.add(k, v)
            if request.method == "HEAD" and "Content-Length" in up.headers:
                resp.headers["Content-Length"] = up.headers["Content-Length"]
                await resp.prepare(request)
                return resp
            if up.headers.get("Content-Length"):
                resp.content_length = int(up.headers["Content-Length"])
            await resp.prepare(request)
            async for chunk in up.content.iter_chunked(1 << 18):
                await resp.write(chunk)
            await resp.write_eof()
            return resp


async def pull_all(urls: list[str], headers: dict[str, str] | None = None
                   ) -> list[tuple[int, str]]:
    """GET each URL at once; per URL its status and the sha256 of its body."""
    async def one(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
        h = hashlib.sha256()
        async with session.get(url, headers=headers or {}) as r:
            async for chunk in r.content.iter_chunked(1 << 20):
                h.update(chunk)
            return r.status, "sha256:" + h.hexdigest()

    async with aiohttp.ClientSession() as s:
        return list(await asyncio.gather(*(one(s, u) for u in urls)))


async def measure(peers: int, *, size: int = 8 * MiB, credential: bool = False,
                  rounds: int = 2, interval: float = 61.0,
                  heartbeat: float = 2.0, workdir: Path | None = None) -> dict:
    """N peers pull one layer `rounds` times, `interval` s apart: the registry's blob HEADs
    and GETs per round, and the HEADs per minute the later rounds cost."""
    with tempfile.TemporaryDirectory(prefix="naiad-registry-load-") as tmp:
        work = workdir or Path(tmp)
        auth_yaml, headers = "", {}
        if credential:
            htpasswd = write_htpasswd(work / "htpasswd", {"puller": "secret"})
            auth_yaml = htpasswd_yaml(htpasswd)
            headers = {"Authorization": basic("puller", "secret")}
        registry = Registry(work / "registry", auth_yaml)
        counter = RegistryCounter(registry.url)
        cluster = Cluster(work)
        try:
            await registry.ready()
            await counter.start()
            data = os.urandom(size)
            digest = await push_blob(registry.url, "bench/layer", data, headers)
            # The daemon's default interval (the tests' 0.5 s makes 100 peers on 2 cores send
            # 200 heartbeats/s, and the scheduler falls behind: peers lose it, and then ask the
            # registry themselves, as designed, which is not what is measured here).
            sched = await cluster.scheduler("--heartbeat-interval", str(heartbeat))
            nodes = []
            for first in range(0, peers, START_BATCH):  # 2 cores: not 100 start-ups at once
                nodes += await asyncio.gather(*(
                    cluster.peer(f"peer-{i}", sched.url, counter.url)
                    for i in range(first, min(peers, first + START_BATCH))))
            heads, gets, seconds = [], [], []
            for r in range(rounds):
                if r:
                    await asyncio.sleep(interval)
                before = (counter.heads, counter.gets)
                started = time.perf_counter()
                got = await pull_all([f"{n.url}/v2/bench/layer/blobs/{digest}" for n in nodes],
                                     headers)
                seconds.append(round(time.perf_counter() - started, 2))
                bad = [g for g in got if g != (200, digest)]
                if bad:
                    raise RuntimeError(f"round {r}: {len(bad)} pulls failed: {bad[:3]}")
                heads.append(counter.heads - before[0])
                gets.append(counter.gets - before[1])
        finally:
            cluster.stop()
            await counter.stop()
            registry.stop()
    later = heads[1:] or heads
    return {"peers": peers, "auth": "shared" if credential else "anonymous", "size": size,
            "heads": heads, "gets": gets, "seconds": seconds, "interval": interval,
            "heads_per_minute": round(sum(later) / len(later) * 60 / interval, 2)}


def line(result: dict) -> str:
    return (f"registry peers={result['peers']} auth={result['auth']} "
            f"heads={','.join(map(str, result['heads']))} "
            f"gets={','.join(map(str, result['gets']))} "
            f"heads/min={result['heads_per_minute']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, default=20)
    p.add_argument("--size", type=parse_size, default=8 * MiB)
    p.add_argument("--credential", action="store_true", help="one shared Basic credential")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--interval", type=float, default=61.0)
    p.add_argument("--heartbeat", type=float, default=2.0, help="the scheduler's interval")
    args = p.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}",
          flush=True)
    result = asyncio.run(measure(args.peers, size=args.size, credential=args.credential,
                                 rounds=args.rounds, interval=args.interval,
                                 heartbeat=args.heartbeat))
    print(f"pull seconds per round: {result['seconds']}")
    print(line(result))


if __name__ == "__main__":
    main()
