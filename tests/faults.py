"""Small real servers that misbehave on purpose: peers that lie or stall, registries that
fail. Fakes only where a fault must be injected; everything else in the tests is real."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from common import ids
from common.pieces import PieceLayout, default_piece_size
from tests.cluster import free_port, member_session, serve


class FakePeer:
    """A registered peer driven by the test through the scheduler's real API."""

    def __init__(self, scheduler: str, peer_id: str, port: int) -> None:
        self.scheduler = scheduler
        self.id = peer_id
        self.port = port

    async def __aenter__(self) -> FakePeer:
        self.session = member_session()  # a member: the daemons' per-user secret
        await self.post("/peers", {"id": self.id, "upload_addr": f"127.0.0.1:{self.port}"})
        self.heartbeats = asyncio.create_task(self._heartbeat())
        return self

    async def post(self, path: str, body: dict) -> dict:
        async with self.session.post(f"{self.scheduler}/api/v1{path}", json=body) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def get(self, path: str) -> dict:
        async with self.session.get(f"{self.scheduler}/api/v1{path}") as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def _heartbeat(self) -> None:
        while True:
            await self.post(f"/peers/{self.id}/heartbeat", {})
            await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        self.heartbeats.cancel()
        await self.session.close()


class CorruptParent:
    """A small real peer that registers, claims every piece of a blob under its true chunk id,
    keeps heartbeating, and serves every chunk with one byte flipped."""

    def __init__(self, scheduler: str, blob: bytes, digest: str) -> None:
        self.scheduler = scheduler
        self.blob = blob
        self.digest = digest
        self.layout = PieceLayout(len(blob), default_piece_size(len(blob)))
        self.chunks: dict[str, bytes] = {}
        self.claims: list[dict] = []
        self.requests = 0
        self.port = free_port()

    async def _chunk(self, request: web.Request) -> web.Response:
        self.requests += 1
        data = bytearray(self.chunks[request.match_info["chunk"]])
        data[len(data) // 2] ^= 0xFF
        return web.Response(body=bytes(data))

    async def __aenter__(self) -> CorruptParent:
        app = web.Application()
        app.router.add_get("/chunks/{chunk}", self._chunk)
        self.runner = await serve(app, self.port)
        self.session = member_session()  # a member gone bad: it knows the secret
        for i in range(self.layout.count):
            start, size = self.layout.span(i)
            piece = self.blob[start:start + size]
            self.chunks[ids.chunk_id(piece)] = piece
            self.claims.append({"index": i, "chunk": ids.chunk_id(piece)})
        assert await self._join(), "the scheduler refused the corrupt parent"
        self.heartbeats = asyncio.create_task(self._heartbeat())
        return self

    async def _join(self) -> bool:
        """Register and claim every piece under its true chunk id; False if the scheduler did
        not take it (down, or restarting)."""
        api = f"{self.scheduler}/api/v1"
        try:
            for path, body in (
                    ("/peers", {"id": "corrupt", "upload_addr": f"127.0.0.1:{self.port}"}),
                    ("/tasks", {"task_id": self.digest, "length": len(self.blob)}),
                    ("/announce", {"peer_id": "corrupt", "task_id": self.digest,
                                   "pieces": self.claims})):
                async with self.session.post(api + path, json=body) as r:
                    if r.status != 200:
                        return False
        except aiohttp.ClientError:
            return False
        return True

    async def _heartbeat(self) -> None:
        """Heartbeat like a peer; after a scheduler restart, join again."""
        while True:
            try:
                async with self.session.post(
                        f"{self.scheduler}/api/v1/peers/corrupt/heartbeat", json={}) as r:
                    known = r.status == 200
            except aiohttp.ClientError:
                known = False
            if not known:
                await self._join()
            await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        self.heartbeats.cancel()
        await self.session.close()
        await self.runner.cleanup()


class FlakyRegistry:
    """An HTTP front for a real registry that fails on purpose: the first `fail` blob GETs
    answer 503, the next `stall` send half their body and hang, and blob bodies trickle out at
    `rate` bytes/s (None: full speed). Counts the blob bytes it sent."""

    RELAYED = ("Content-Type", "Content-Length", "Content-Range", "Docker-Content-Digest",
               "Location", "WWW-Authenticate", "Accept-Ranges")

    def __init__(self, registry_url: str, fail: int = 0, rate: int | None = None,
                 stall: int = 0) -> None:
        self.registry = registry_url.rstrip("/")
        self.fail = fail
        self.rate = rate
        self.stall = stall  # the first `stall` blob GETs send half their body, then hang
        self.stalled = 0
        self._released = asyncio.Event()  # set on exit: hung responses end
        self.failed = 0
        self.blob_bytes = 0
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FlakyRegistry:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = await serve(app, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._released.set()
        await self.runner.cleanup()
        await self.session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        blob = "/blobs/sha256:" in request.path and request.method == "GET"
        if blob and self.failed < self.fail:
            self.failed += 1
            return web.Response(status=503, text="registry overloaded, try again")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("range", "authorization", "accept")}
        async with self.session.request(request.method, self.registry + request.path_qs,
                                        headers=headers, data=await request.read(),
                                        allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: up.headers[k] for k in self.RELAYED if k in up.headers})
            await resp.prepare(request)
            hang_after = None
            if blob and up.status in (200, 206) and self.stalled < self.stall:
                self.stalled += 1
                hang_after = (up.content_length or 0) // 2
            sent = 0
            async for chunk in up.content.iter_chunked(64 << 10):
                if hang_after is not None and sent >= hang_after:
                    await self._released.wait()  # hung until the test ends
                    break
                sent += len(chunk)
                if blob:
                    self.blob_bytes += len(chunk)
                await resp.write(chunk)
                if blob and self.rate:
                    await asyncio.sleep(len(chunk) / self.rate)
            await resp.write_eof()
            return resp


class ScriptedProxy:
    """A nydusd proxy (absolute-form targets) or mirror (`X-Dragonfly-Registry` names the
    upstream) that answers its first requests from a script — `(status, marked)`, marked adding
    `X-Dragonfly-Error-Type: proxy` — then relays to the registry. Records every request's
    headers: what the client sent, and how often."""

    def __init__(self, script: list[tuple[int, bool]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[dict[str, str]] = []
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedProxy:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = await serve(app, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        if self.script:
            status, marked = self.script.pop(0)
            return web.Response(status=status, text=f"scripted {status}", headers=(
                {"X-Dragonfly-Error-Type": "proxy"} if marked else {}))
        target = request.raw_path
        if not target.startswith("http"):
            target = request.headers["X-Dragonfly-Registry"].rstrip("/") + request.path_qs
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("range", "authorization")}
        async with self.session.get(target, headers=headers, allow_redirects=False) as up:
            return web.Response(status=up.status, body=await up.read(), headers={
                k: up.headers[k] for k in FlakyRegistry.RELAYED if k in up.headers
                and k != "Content-Length"})
