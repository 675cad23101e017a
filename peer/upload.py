"""The upload server other peers fetch chunks from (`--upload`).

It serves only chunks in the store, which are verified before they are written, by id, straight
from disk (sendfile; over TLS, read and written), at most `upload_slots` at a time and at most
`per_address` to one remote address: beyond that it answers 503 at once so the child moves on
to another parent instead of queueing. A child that reads slower than `min_rate` for about
STALL_WINDOW seconds is cut off and its slot freed, so clients that never read cannot hold the
slots. A child that accepts zstd gets the chunk compressed when that saves at least 10%
(peer/wire.py), decided once per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from common import auth, ids
from common.limits import TokenBucket
from common.log import request_ids
from common.metrics import PeerMetrics
from common.sizes import format_size
from common.tasks import Activity, consume_exception
from common.web import error, errors_as_json, healthy, send_file
from peer import wire
from peer.store import ChunkStore

log = logging.getLogger("naiad.peer.upload")
PACED_SLICE = 64 << 10
MIN_RATE = 64 << 10  # bytes/s a child must read at (--upload-min-rate)
STALL_WINDOW = 5.0  # seconds below MIN_RATE before a child is cut off


class SendDeadline:
    """The minimum send rate as a moving deadline (pure: times are given). A send starts with
    `window` seconds of credit and each byte sent earns 1/min_rate s more, never more than
    `window` ahead of now: a child reading below min_rate, or not at all, runs out within about
    a window, however fast it read before. Time spent waiting on our own --upload-rate is not
    the child's fault and is added back."""

    def __init__(self, min_rate: float, window: float, now: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self.at = now + window

    def sent(self, n: int, now: float) -> None:
        self.at = min(now + self.window, self.at + n / self.min_rate)

    def paused(self, seconds: float) -> None:
        self.at += seconds


def per_address_default(slots: int) -> int:
    """Upload slots one remote address may hold unless told: half of them, at least one."""
    return max(1, slots // 2)


class UploadServer:
    def __init__(self, store: ChunkStore, metrics: PeerMetrics, slots: int,
                 secret: bytes | None = None, compress: bool = True,
                 rate: TokenBucket | None = None, per_address: int | None = None,
                 min_rate: int | None = MIN_RATE) -> None:
        self.store = store
        self.rate = rate  # --upload-rate: bytes to other peers
        self.per_address = per_address or per_address_default(slots)
        self.min_rate = min_rate or None  # None or 0: no minimum
        # sendfile in slices a child at min_rate drains in half a window, so progress earns
        # deadline credit as it goes (one call for a whole chunk reports progress only at its end).
        self._slice = max(PACED_SLICE, int(self.min_rate * STALL_WINDOW / 2)) \
            if self.min_rate else 0
        self.by_address: Counter[str] = Counter()  # uploads in flight by remote address
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
            remote = request.remote or ""
            if self.active >= self.slots:
                return _busy("no free upload slot")
            if self.by_address[remote] >= self.per_address:
                return _busy(f"{remote} holds {self.per_address} upload slots already")
            self.active += 1
            self.by_address[remote] += 1
            self.activity.set_busy(True)
            try:
                return await self._send(request, chunk, f)
            finally:
                self.active -= 1
                self.by_address[remote] -= 1
                if not self.by_address[remote]:
                    del self.by_address[remote]
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
        resp = web.StreamResponse(headers=headers)
        resp.content_length = size
        await resp.prepare(request)
        if request.method != "GET":
            await resp.write_eof()
            return resp
        try:
            sent = await self._body(request, resp, f, size)
        except ConnectionError as e:  # the child went away: nothing to answer
            log.debug("upload of %s to %s broken: %r", chunk, request.remote, e)
            _cut_off(request)
            return resp
        if not sent:
            log.info("upload of %s to %s cut off: below %s/s for %.0f s", chunk,
                     request.remote, format_size(self.min_rate or 0), STALL_WINDOW)
            _cut_off(request)
            return resp
        await resp.write_eof()
        log.debug("uploaded %s to %s", chunk, request.remote)
        self.metrics.upload_bytes.inc(size)
        self.uploaded += size
        return resp

    async def _body(self, request: web.Request, resp: web.StreamResponse, f: BinaryIO,
                    size: int) -> bool:
        """Send the chunk's bytes under the minimum-rate deadline; False if it passed.

        By sendfile on plain TCP; read and written (at most one piece in memory) over TLS,
        where sendfile would fall back to 16 KiB reads each in a worker thread, and at
        --upload-rate, written in slices as the bucket allows so every child sees bytes
        flowing and none mistakes the wait for a stall."""
        loop = asyncio.get_running_loop()
        deadline = SendDeadline(self.min_rate, STALL_WINDOW, loop.time()) \
            if self.min_rate else None
        tls = request.transport is not None \
            and request.transport.get_extra_info("sslcontext") is not None
        try:
            async with asyncio.timeout_at(deadline.at if deadline else None) as timer:
                def sent(n: int) -> None:
                    if deadline is not None:
                        deadline.sent(n, loop.time())
                        timer.reschedule(deadline.at)

                if self.rate is None and not tls:
                    step = self._slice or size or 1
                    for offset in range(0, size, step):
                        n = min(step, size - offset)
                        await send_file(request, f, offset, n)
                        sent(n)
                    return True
                view = memoryview(await asyncio.to_thread(f.read))  # at most one piece
                step = PACED_SLICE if self.rate is not None else self._slice or len(view) or 1
                for offset in range(0, len(view), step):
                    part = view[offset:offset + step]
                    wait = self.rate.delay(len(part)) if self.rate is not None else 0.0
                    if wait > 0:
                        if deadline is not None:
                            deadline.paused(wait)
                            timer.reschedule(deadline.at)
                        await asyncio.sleep(wait)
                    await resp.write(part)
                    sent(len(part))
                return True
        except TimeoutError:
            if timer.expired():
                return False
            raise

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


def _busy(reason: str) -> web.Response:
    resp = error(503, reason)
    resp.headers["Retry-After"] = "1"
    return resp


def _cut_off(request: web.Request) -> None:
    """Drop the connection at once, with a reset: what the kernel still holds for a child that
    does not read is discarded rather than kept for retransmission."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _open_or_none(path: Path) -> BinaryIO | None:
    """A stored file opened for sendfile (on the loop: a local open takes microseconds), or None
    if it is not there."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None
