"""A registry that redirects blob reads to object storage with signed URLs (as distribution does
with S3 and `redirect` on): the peer follows, remembers the target, asks the registry again when
the signature stops working, and a blob stays one task whatever its URLs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from urllib.parse import quote

import aiohttp
from aiohttp import web

from common.ranges import parse_range
from tests.cluster import Cluster, free_port, serve

MiB = 1 << 20
USES_PER_SIGNATURE = 3


class RedirectingRegistry:
    """Blob GETs and HEADs answer 307 to a presigned object-store URL (a new signature each
    time, good for a few requests and for GET only, like S3's); the object store serves
    ranges."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redirects = 0
        self.store_requests = 0
        self.refused = 0
        self.signatures: dict[str, int] = {}  # signature -> uses left

    async def _base(self, _: web.Request) -> web.Response:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if digest not in self.blobs:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        self.redirects += 1
        sig = secrets.token_hex(8)
        self.signatures[sig] = USES_PER_SIGNATURE
        raise web.HTTPTemporaryRedirect(
            f"{self.url}/store/{digest}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Expires=60&X-Amz-Signature={sig}&x-id=GetObject")

    async def _store(self, request: web.Request) -> web.StreamResponse:
        self.store_requests += 1
        sig = request.query.get("X-Amz-Signature", "")
        if request.method != "GET" or self.signatures.get(sig, 0) <= 0 \
                or "Authorization" in request.headers:
            self.refused += 1
            return web.Response(status=403, text="SignatureDoesNotMatch")
        self.signatures[sig] -= 1
        data = self.blobs[request.match_info["digest"]]
        rng = parse_range(request.headers.get("Range"), len(data))
        if rng is None:
            return web.Response(body=data)
        return web.Response(body=data[rng.start:rng.end + 1], status=206,
                            headers={"Content-Range": rng.content_range(len(data))})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/store/{digest}", self._store)
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()


async def test_signed_redirects_followed_remembered_renewed(cluster: Cluster) -> None:
    blob = os.urandom(12 * MiB + 5)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    registry = RedirectingRegistry({digest: blob})
    await registry.start()
    try:
        sched = await cluster.scheduler()
        a, b = await asyncio.gather(cluster.peer("a", sched.url, registry.url),
                                    cluster.peer("b", sched.url, registry.url))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{a.url}/v2/lib/app/blobs/{digest}") as r:
                assert r.status == 200 and await r.read() == blob
            async with s.get(f"{b.url}/v2/other/name/blobs/{digest}",
                             headers={"Range": "bytes=5-9000000"}) as r:
                assert r.status == 206 and await r.read() == blob[5:9000001]
            # The same blob as plain files under two differently signed URLs: one task.
            task_ids = set()
            for _ in range(2):
                async with s.get(f"{registry.url}/v2/lib/app/blobs/{digest}",
                                 allow_redirects=False) as r:
                    signed = r.headers["Location"]
                async with s.get(f"{a.url}/download?url={quote(signed, safe='')}") as r:
                    assert r.status == 200 and await r.read() == blob
                    task_ids.add(r.headers["X-Naiad-Task-Id"])
            assert len(task_ids) == 1
            async with s.get(f"{sched.url}/api/v1/tasks") as r:
                tasks = [t["task_id"] for t in (await r.json())["tasks"]]
        assert tasks.count(digest) == 1 and len(tasks) == 2  # the blob, and the URL task
        # Targets were remembered (fewer redirects than object-store requests) and renewed
        # when a signature was used up (the store refused, the registry was asked again).
        assert registry.redirects < registry.store_requests
        assert registry.refused >= 1
        assert registry.redirects >= 2
    finally:
        await registry.stop()
