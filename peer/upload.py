"""The upload server other peers fetch chunks from (`--upload`).

It serves only chunks in the store, which are verified before they are written, by id, straight
from disk (sendfile), at most `upload_slots` at a time: beyond that it answers 503 at once so the
child moves on to another parent instead of queueing.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from common import auth, ids
from common.metrics import PeerMetrics
from common.web import error, errors_as_json, healthy
from peer.store import ChunkStore


class _ChunkFile(web.FileResponse):
    """A FileResponse the handler sends itself (to hold an upload slot for the whole transfer);
    aiohttp's second `prepare` after the handler returns must then do nothing."""

    async def prepare(self, request: web.BaseRequest) -> object:
        if self.prepared:
            return None
        return await super().prepare(request)


class UploadServer:
    def __init__(self, store: ChunkStore, metrics: PeerMetrics, slots: int,
                 secret: bytes | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.slots = slots
        self.secret = secret
        self.active = 0
        self.uploaded = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[
            errors_as_json,
            auth.require_secret(self.secret, lambda r: r.path.startswith("/chunks/"))])
        app.router.add_get("/chunks/{chunk}", self.chunk)
        app.router.add_get("/healthy", healthy)
        return app

    async def chunk(self, request: web.Request) -> web.StreamResponse:
        chunk = request.match_info["chunk"]
        try:
            ids.parse_chunk_id(chunk)
        except ids.InvalidIdentifier as e:
            return error(400, str(e))
        path = self.store.chunk_path(chunk)
        if not path.exists():
            return error(404, f"chunk {chunk} is not held here")
        if self.active >= self.slots:
            resp = error(503, "no free upload slot")
            resp.headers["Retry-After"] = "1"
            return resp
        self.active += 1
        self.idle.clear()
        try:
            resp = _ChunkFile(path, headers={"Content-Type": "application/octet-stream"})
            await resp.prepare(request)
            if request.method == "GET":
                size = path.stat().st_size
                self.metrics.upload_bytes.inc(size)
                self.uploaded += size
            return resp
        finally:
            self.active -= 1
            if not self.active:
                self.idle.set()
