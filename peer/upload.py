"""The upload server other peers fetch chunks from (`--upload`).

It serves only chunks in the store, which are verified before they are written, by id, straight
from disk (sendfile; over TLS, read and written), at most `upload_slots` at a time and at most
`per_address` to one remote address: beyond that it answers 503 at once so the child moves on
to another parent instead of queueing. A child that reads slower than `min_rate` for about
STALL_WINDOW seconds is cut off and its slot freed, so clients that never read cannot hold the
slots. A watchdog samples how much the child's kernel acknowledged (TCP_INFO), so a chunk still
goes in one sendfile; where TCP_INFO cannot be read, sends are sliced to show progress. A child
that accepts zstd gets the chunk compressed when that saves at least 10% (peer/wire.py), decided
once per chunk: the compressed copy is kept beside it, a chunk that does not pay remembered in
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from common import auth, ids
from common.flight import SingleFlight
from common.limits import TokenBucket
from common.log import request_ids
from common.metrics import PeerMetrics
from common.sizes import format_size
from common.tasks import Activity
from common.web import error, errors_as_json, healthy, send_file, unavailable
from peer import wire
from peer.store import ChunkStore

log = logging.getLogger("naiad.peer.upload")
PACED_SLICE = 64 << 10
# Over TLS, writes of at most this: asyncio's TLS transport takes one write whole, ciphertext and
# all, without pushing back, so a piece in one write to a child that never reads would end the
# upload, free its slot and leave the piece in our memory. Slices wait on drain (and measured
# faster than one write per piece: 700-750 against 350-390 MB/s on loopback).
TLS_SLICE = 256 << 10
MIN_RATE = 64 << 10  # bytes/s a child must read at (--upload-min-rate)
STALL_WINDOW = 5.0  # seconds below MIN_RATE before a child is cut off
SAMPLES_PER_WINDOW = 10  # TCP progress samples per STALL_WINDOW: a stall is seen within 0.5 s
# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_acked at byte 120, there since Linux 4.1; other
# systems lay out their tcp_info differently.
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120
RAW_REMEMBERED = 1 << 14  # incompressible chunks remembered (16 GiB of 1 MiB chunks, ~2 MB)
# How the bytes of a piece reach the child, whichever the transport: a slice written (waiting
# for the transport to drain), or a range of the open file by sendfile.
Write = Callable[[memoryview], Awaitable[None]]
SendFile = Callable[[BinaryIO, int, int], Awaitable[None]]


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


def tcp_bytes_acked(sock: socket.socket | None) -> int | None:
    """Bytes of this connection the peer's kernel has acknowledged (TCP_INFO tcpi_bytes_acked),
    or None where that cannot be read: not Linux, not a TCP socket, a closed one, or a kernel
    whose struct tcp_info stops short of the field. None means: measure progress otherwise."""
    if _TCP_INFO is None or sock is None:
        return None
    end = _BYTES_ACKED_AT + _BYTES_ACKED.size
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, end)
    except OSError:
        return None
    if len(info) < end:
        return None
    return int(_BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0])


@contextlib.contextmanager
def _ack_watchdog(sock: socket.socket | None, deadline: SendDeadline | None,
                  timer: asyncio.Timeout) -> Iterator[bool]:
    """While in scope, credits `deadline` with the bytes the child acknowledged, sampled from
    the kernel SAMPLES_PER_WINDOW times a window, and moves `timer` with it: a chunk can go in
    one sendfile (or write) whose own progress shows only at its end. Yields False, doing
    nothing, without a deadline or where TCP_INFO cannot be read: the caller measures progress
    itself then. Leave it before `timer`'s scope."""
    acked = tcp_bytes_acked(sock) if deadline is not None else None
    if deadline is None or acked is None:
        yield False
        return
    loop = asyncio.get_running_loop()
    interval = deadline.window / SAMPLES_PER_WINDOW

    def sample() -> None:
        nonlocal acked, handle
        if timer.expired():
            return
        now_acked = tcp_bytes_acked(sock)
        if now_acked is None:  # closed meanwhile: the send fails, or the deadline cuts it
            return
        deadline.sent(now_acked - acked, loop.time())
        acked = now_acked
        timer.reschedule(deadline.at)
        handle = loop.call_later(interval, sample)

    handle = loop.call_later(interval, sample)
    try:
        yield True
    finally:
        handle.cancel()


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
        # Without TCP_INFO: sendfile in slices a child at min_rate drains in half a window, so
        # progress earns deadline credit as it goes (one call reports progress only at its end).
        self._slice = max(PACED_SLICE, int(self.min_rate * STALL_WINDOW / 2)) \
            if self.min_rate else 0
        self.by_address: Counter[str] = Counter()  # uploads in flight by remote address
        self.compress = compress
        # One compression per chunk at a time, shared by the uploads that want it meanwhile.
        self._packing: SingleFlight[str, Path | None] = SingleFlight()
        # Chunks found not to compress, least recently asked first: a file per chunk saying
        # so cost more than the sample's trial; one forgotten is tried again.
        self._raw: OrderedDict[str, None] = OrderedDict()
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
        f = open_or_none(self.store.chunk_path(chunk))
        if f is None:
            return error(404, f"chunk {chunk} is not held here")
        with f:
            remote = request.remote or ""
            refused = self.admit(remote)
            if refused is not None:
                return unavailable(refused)
            try:
                return await self._send(request, chunk, f)
            finally:
                self.release(remote)

    def admit(self, remote: str) -> str | None:
        """Take an upload slot for `remote`; None if taken, else why not (busy: the child
        moves on without blame). Both transports count against the same slots."""
        if self.active >= self.slots:
            return "no free upload slot"
        if self.by_address[remote] >= self.per_address:
            return f"{remote} holds {self.per_address} upload slots already"
        self.active += 1
        self.by_address[remote] += 1
        self.activity.set_busy(True)
        return None

    def release(self, remote: str) -> None:
        self.active -= 1
        self.by_address[remote] -= 1
        if not self.by_address[remote]:
            del self.by_address[remote]
        self.activity.set_busy(bool(self.active))

    def uploaded_piece(self, size: int) -> None:
        self.metrics.upload_bytes.inc(size)
        self.uploaded += size

    async def _send(self, request: web.Request, chunk: str,
                    f: BinaryIO) -> web.StreamResponse:
        headers = {"Content-Type": "application/octet-stream", "Vary": "Accept-Encoding"}
        if self.compress and wire.ENCODING in request.headers.get("Accept-Encoding", ""):
            pf = await self.open_packed(chunk, f)
            if pf is not None:
                with pf:
                    headers["Content-Encoding"] = wire.ENCODING
                    return await self._send_file(request, chunk, pf, headers)
        return await self._send_file(request, chunk, f, headers)

    async def open_packed(self, chunk: str, f: BinaryIO) -> BinaryIO | None:
        """The compressed copy of a chunk (open as `f`) opened, if it pays and still exists
        (else dropped meanwhile: the raw chunk still serves)."""
        packed = await self._packed(chunk, f)
        return open_or_none(packed) if packed is not None else None

    async def _send_file(self, request: web.Request, chunk: str, f: BinaryIO,
                         headers: dict[str, str]) -> web.StreamResponse:
        size = os.fstat(f.fileno()).st_size
        resp = web.StreamResponse(headers=headers)
        resp.content_length = size
        try:
            await resp.prepare(request)
            if request.method != "GET":
                await resp.write_eof()
                return resp
            sent = await self.body(request.transport, f, size, resp.write,
                                   lambda f, offset, n: send_file(request, f, offset, n))
        except ConnectionError as e:  # the child went away: nothing to answer
            log.debug("upload of %s to %s broken: %r", chunk, request.remote, e)
            cut_off(request.transport)
            return resp
        if not sent:
            log.info("upload of %s to %s cut off: below %s/s for %.0f s", chunk,
                     request.remote, format_size(self.min_rate or 0), STALL_WINDOW)
            cut_off(request.transport)
            return resp
        await resp.write_eof()
        log.debug("uploaded %s to %s", chunk, request.remote)
        self.uploaded_piece(size)
        return resp

    async def body(self, transport: asyncio.BaseTransport | None, f: BinaryIO, size: int,
                   write: Write, sendfile: SendFile) -> bool:
        """Send the chunk's bytes under the minimum-rate deadline; False if it passed.

        By one sendfile on plain TCP; read (at most one piece in memory) and written in slices
        of TLS_SLICE over TLS, where sendfile would fall back to 16 KiB reads each in a worker
        thread; at --upload-rate, written in slices as the bucket allows so every child sees
        bytes flowing and none mistakes the wait for a stall. The deadline earns credit from
        the bytes the child acknowledged (`_ack_watchdog`) or, where TCP_INFO cannot be read,
        as each slice of at most `_slice` bytes is sent."""
        loop = asyncio.get_running_loop()
        deadline = SendDeadline(self.min_rate, STALL_WINDOW, loop.time()) \
            if self.min_rate else None
        tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        sock = transport.get_extra_info("socket") if transport is not None else None
        try:
            async with asyncio.timeout_at(deadline.at if deadline else None) as timer:
                with _ack_watchdog(sock, deadline, timer) as watched:
                    sliced = deadline is not None and not watched

                    def sent(n: int) -> None:
                        if sliced and deadline is not None:
                            deadline.sent(n, loop.time())
                            timer.reschedule(deadline.at)

                    if self.rate is None and not tls:
                        step = self._slice if sliced else size or 1
                        for offset in range(0, size, step):
                            n = min(step, size - offset)
                            await sendfile(f, offset, n)
                            sent(n)
                        return True
                    view = memoryview(await asyncio.to_thread(f.read))  # at most one piece
                    step = PACED_SLICE if self.rate is not None else \
                        min(self._slice, TLS_SLICE) if sliced else TLS_SLICE
                    for offset in range(0, len(view), step):
                        part = view[offset:offset + step]
                        wait = self.rate.delay(len(part)) if self.rate is not None else 0.0
                        if wait > 0:
                            if deadline is not None:
                                deadline.paused(wait)
                                timer.reschedule(deadline.at)
                            await asyncio.sleep(wait)
                        await write(part)
                        sent(len(part))
                    return True
        except TimeoutError:
            if timer.expired():
                return False
            raise

    async def _packed(self, chunk: str, f: BinaryIO) -> Path | None:
        """The compressed sidecar of a chunk (open as `f`), made on first demand; None if it
        does not pay."""
        if chunk in self._raw:
            self._raw.move_to_end(chunk)
            return None
        packed = self.store.packed_path(chunk)
        if packed.exists():
            return packed
        if wire.sample_says_raw(f.fileno(), os.fstat(f.fileno()).st_size):
            self._remember_raw(chunk)
            return None
        return await self._packing.run(chunk, lambda: self._pack_once(chunk))

    def _remember_raw(self, chunk: str) -> None:
        self._raw[chunk] = None
        if len(self._raw) > RAW_REMEMBERED:
            self._raw.popitem(last=False)

    async def _pack_once(self, chunk: str) -> Path | None:
        try:
            packed = await asyncio.to_thread(self._pack, chunk)
        except OSError as e:  # the chunk went away (evicted, dropped): serve what exists
            log.debug("cannot pack %s: %s", chunk, e)
            return None
        if packed is None:
            self._remember_raw(chunk)
        return packed

    def _pack(self, chunk: str) -> Path | None:
        packed = wire.pack_file(self.store.chunk_path(chunk))
        if packed is None:
            return None
        self.store.write_sidecar(self.store.packed_path(chunk), packed)
        return self.store.packed_path(chunk)


def cut_off(transport: asyncio.BaseTransport | None) -> None:
    """Drop the connection at once, with a reset: what the kernel still holds for a child that
    does not read is discarded rather than kept for retransmission."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def open_or_none(path: Path) -> BinaryIO | None:
    """A stored file opened for sendfile (on the loop: a local open takes microseconds), or None
    if it is not there."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None
