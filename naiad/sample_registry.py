"""A tiny in-memory registry serving blobs by digest, with Range, counting every body byte it
sends. The demo's origin; small enough to read in a minute, real HTTP all the same."""

from __future__ import annotations

import hashlib
import json

from aiohttp import web

from common.ranges import InvalidRange, UnsatisfiableRange, parse_range
from common.web import Server, bodiless, error


class SampleRegistry:
    def __init__(self, listen: str = "127.0.0.1:0") -> None:
        self.blobs: dict[str, bytes] = {}
        self.bytes_sent = 0
        self.requests = 0
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", self._blob)
        self.server = Server(app, listen)

    def add(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def _base(self, _: web.Request) -> web.Response:
        return web.Response(text=json.dumps({}), content_type="application/json")

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return error(404, "blob unknown")
        try:
            rng = parse_range(request.headers.get("Range"), len(data))
        except (InvalidRange, UnsatisfiableRange) as e:
            return error(416, str(e))
        headers = {"Docker-Content-Digest": request.match_info["digest"],
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        body, status = data, 200
        if rng is not None:
            body, status = data[rng.start:rng.end + 1], 206
            headers["Content-Range"] = rng.content_range(len(data))
        if request.method == "HEAD":
            return await bodiless(request, status, headers, len(body))
        self.bytes_sent += len(body)
        return web.Response(body=body, status=status, headers=headers)
