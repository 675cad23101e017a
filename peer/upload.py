"""The upload server other peers fetch chunks from (`--upload`).

It serves only chunks in the store, which are verified before they are written, by id, straight
from disk (sendfile), at most `upload_slots` at a time: beyond that it answers 503 at once so the
child moves on to another parent instead of queueing. A child that accepts zstd gets the chunk
compressed when that saves at least 10% (peer/wire.py), decided once per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from common import auth, ids
from common.limits import TokenBucket
from common.log import request_ids
from common.metrics import PeerMetrics
from common.tasks import Activity, consume_exception
from common.web import error, errors_as_json, healthy, send_file
from peer import wire
from peer.store import ChunkStore

log = logging.getLogger("naiad.peer.upload")
PACED_SLICE = 64 << 10


class UploadServer:
    def __init__(self, store: ChunkStore, metrics: PeerMetrics, slots: int,
                 secret: bytes | None = None, compress: bool = True,
                 rate: TokenBucket | None = None) -> None:
        self.store = store
        self.rate = rate  # --upload-rate: bytes to other peers
        self.compress = compress
        self._packing: dict[str, asyncio.Future[Path | None]] = {}
        self.metrics = metrics
        self.slots = slots
        self.secret = secret
        self.active = 0
        self.uploaded = 0
        self.activity = Activity()

    def app(self) -> web.Application:
        app = request_ids(web.Application(middlewares=[
            errors_as_json,
            auth.authenticate(auth.Verifier(self.secret) if self.secret is not None else None,
                              lambda r: r.path.startswith("/chunks/"))]))
        app.router.add_get("/chunks/{chunk}", self.chunk)
        app.router.add_get("/healthy", healthy)
        return app

    async def chunk(self, request: web.Request) -> web.StreamResponse:
        chunk = request.match_info["chunk"]
        try:
            ids.parse_chunk_id(chunk)
        except ids.InvalidIdentifier as e:
            return error(400, str(e))
        f = _open_or_none(self.store.chunk_path(chunk))
        if f is None:
            return error(404, f"chunk {chunk} is not held here")
        with f:
            if self.active >= self.slots:
                resp = error(503, "no free upload slot")
                resp.headers["Retry-After"] = "1"
                return resp
            self.active += 1
            self.activity.set_busy(True)
            try:
                return await self._send(request, chunk, f)
            finally:
                self.active -= 1
                self.activity.set_busy(bool(self.active))

    async def _send(self, request: web.Request, chunk: str,
                    f: BinaryIO) -> web.StreamResponse:
        headers = {"Content-Type": "application/octet-stream", "Vary": "Accept-Encoding"}
        if self.compress and wire.ENCODING in request.headers.get("Accept-Encoding", ""):
            packed = await self._packed(chunk)
            pf = _open_or_none(packed) if packed is not None else None
            if pf is not None:  # else dropped meanwhile: the raw chunk still serves
                with pf:
                    headers["Content-Encoding"] = wire.ENCODING
                    return await self._send_file(request, chunk, pf, headers)
        return await self._send_file(request, chunk, f, headers)

    async def _send_file(self, request: web.Request, chunk: str, f: BinaryIO,
                         headers: dict[str, str]) -> web.StreamResponse:
        size = os.fstat(f.fileno()).st_size
        if self.rate is not None and request.method == "GET":
            resp = await self._paced(request, f, headers, self.rate)
        else:
            resp = web.StreamResponse(headers=headers)
            resp.content_length = size
            await resp.prepare(request)
            if request.method == "GET":
                await send_file(request, f, 0, size)
            await resp.write_eof()
        if request.method == "GET":
            log.debug("uploaded %s to %s", chunk, request.remote)
            self.metrics.upload_bytes.inc(size)
            self.uploaded += size
        return resp

    @staticmethod
    async def _paced(request: web.Request, f: BinaryIO, headers: dict[str, str],
                     bucket: TokenBucket) -> web.StreamResponse:
        """A chunk sent at --upload-rate: written in slices as the bucket allows (not
        sendfile), so every child sees bytes flowing and none mistakes the wait for a stall."""
        data = await asyncio.to_thread(f.read)  # at most one piece
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        view = memoryview(data)
        for k in range(0, len(data), PACED_SLICE):
            part = view[k:k + PACED_SLICE]
            await bucket.take(len(part))
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def _packed(self, chunk: str) -> Path | None:
        """The compressed sidecar of a chunk, made on first demand; None if it does not pay."""
        packed = self.store.packed_path(chunk)
        if packed.exists():
            return packed
        if self.store.raw_marker(chunk).exists():
            return None
        pending = self._packing.get(chunk)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Path | None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(consume_exception)
        self._packing[chunk] = fut
        try:
            result = await asyncio.to_thread(self._pack, chunk)
            fut.set_result(result)
            return result
        except OSError as e:  # the chunk went away (evicted, dropped): serve what exists
            fut.set_result(None)
            log.debug("cannot pack %s: %s", chunk, e)
            return None
        finally:
            del self._packing[chunk]

    def _pack(self, chunk: str) -> Path | None:
        packed = wire.pack_file(self.store.chunk_path(chunk))
        if packed is None:
            self.store.raw_marker(chunk).touch()  # empty: nothing to tear, no temp file needed
            return None
        self.store.write_sidecar(self.store.packed_path(chunk), packed)
        return self.store.packed_path(chunk)


def _open_or_none(path: Path) -> BinaryIO | None:
    """A stored file opened for sendfile (on the loop: a local open takes microseconds), or None
    if it is not there."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None
