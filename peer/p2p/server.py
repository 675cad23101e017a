"""The framed transport's parent side, on the upload port beside HTTP (common/web.py `Server`
tells the two apart by PREFACE).

One connection per child carries many requests: each takes an upload slot as an HTTP request
would (`UploadServer.admit`: BUSY at once beyond the slots, no queueing) and the answers go out
one at a time, the most urgent first, each by sendfile from the chunk file (over TLS or at
--upload-rate, in slices) under the same minimum-rate deadline. A child below it is cut off,
and with it the connection. A connection must send its HELLO within the header deadline and is
closed when idle that long, as HTTP keep-alive is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import BinaryIO

from common import auth, ids
from common.limits import ON_DEMAND, PrioritySlots
from common.log import adopt, request_id
from common.sizes import format_size
from common.web import ClientLimits
from peer.p2p import frames
from peer.upload import STALL_WINDOW, UploadServer, cut_off, open_or_none

log = logging.getLogger("naiad.peer.upload")
PENDING = 64  # requests one connection may have unanswered; beyond, it is not read
CONTROL = ON_DEMAND + 1  # a BUSY or MISSING answer goes before any piece still queued


class _CutOff(Exception):
    """The connection is done for (a child below the minimum rate, or gone)."""


# How a connection ends that is nobody's bug: logged at debug.
ENDINGS = (frames.FrameError, asyncio.IncompleteReadError, ConnectionError, TimeoutError,
           _CutOff)


class FramedEndpoint:
    preface = frames.PREFACE

    def __init__(self, upload: UploadServer, limits: ClientLimits | None = None) -> None:
        self.upload = upload
        self.verifier = auth.Verifier(upload.secret) if upload.secret is not None else None
        self.idle = (limits or ClientLimits()).header_timeout
        self._connections: set[asyncio.Task[None]] = set()

    def protocol(self) -> asyncio.Protocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), self._connected)

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("framed upload connection failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        remote = str(peer[0]) if peer else ""
        try:
            async with asyncio.timeout(self.idle):  # the header deadline
                head = frames.parse_header(await reader.readexactly(frames.HEADER.size))
                if head.kind != frames.HELLO:
                    raise frames.FrameError("expected HELLO")
                body = await reader.readexactly(head.length)
            try:
                frames.check_hello(self.verifier, body)
            except auth.AuthError as e:
                log.debug("framed connection from %s refused: %s", remote, e.reason)
                writer.write(frames.frame(frames.ERROR, e.reason.encode()))
                await writer.drain()
                return
            writer.write(frames.welcome(self.upload.per_address))
            await _Connection(self, reader, writer, remote).run()
        except ENDINGS as e:
            log.debug("framed connection from %s ended: %r", remote, e)
        finally:
            writer.close()


class _Connection:
    def __init__(self, endpoint: FramedEndpoint, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, remote: str) -> None:
        self.endpoint = endpoint
        self.upload = endpoint.upload
        self.reader = reader
        self.writer = writer
        self.remote = remote
        self.turn = PrioritySlots(1)  # one answer on the wire at a time, urgent first
        self.pending = asyncio.Semaphore(PENDING)
        self.answering = 0

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as answers:
                while True:
                    await self.pending.acquire()
                    head = await self._next()
                    if head is None:
                        return
                    if head.kind != frames.REQUEST:
                        raise frames.FrameError(f"frame kind {head.kind} from a child")
                    size, chunk, trace = frames.parse_request(
                        await self.reader.readexactly(head.length))
                    self.answering += 1
                    answers.create_task(self._answer(head, size, chunk, trace))
        except ExceptionGroup as group:
            ended, unexpected = group.split(ENDINGS)
            if unexpected is not None:
                raise unexpected from None
            assert ended is not None
            raise _CutOff(repr(ended.exceptions[0])) from None

    async def _next(self) -> frames.Frame | None:
        """The next request's header; None when the child closed or stayed idle too long."""
        while True:
            try:
                async with asyncio.timeout(self.endpoint.idle):
                    data = await self.reader.readexactly(frames.HEADER.size)
                return frames.parse_header(data)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                return None
            except TimeoutError:
                if not self.answering:
                    return None

    async def _answer(self, head: frames.Frame, size: int, chunk: str,
                      trace: str | None) -> None:
        request_id.set(adopt(trace))  # this task's own context: its log records carry it
        try:
            await self._serve_chunk(head.request, size, chunk, min(head.status, ON_DEMAND),
                                    head.encoding == frames.ZSTD)
        finally:
            self.answering -= 1
            self.pending.release()

    async def _control(self, request: int, status: int, reason: str) -> None:
        async with self.turn.hold(CONTROL):
            self.writer.write(frames.frame(frames.PIECE, reason.encode()[:frames.MAX_CONTROL],
                                           request, status))
            await self.writer.drain()

    async def _serve_chunk(self, request: int, size: int, chunk: str, priority: int,
                           accept_zstd: bool) -> None:
        try:
            ids.parse_chunk_id(chunk)
        except ids.InvalidIdentifier as e:
            return await self._control(request, frames.FAILED, str(e))
        f = open_or_none(self.upload.store.chunk_path(chunk))
        if f is None:
            return await self._control(request, frames.MISSING,
                                       f"chunk {chunk} is not held here")
        with f:
            held = os.fstat(f.fileno()).st_size
            if held != size:
                return await self._control(request, frames.FAILED,
                                           f"chunk {chunk} has {held} bytes, not {size}")
            refused = self.upload.admit(self.remote)
            if refused is not None:
                return await self._control(request, frames.BUSY, refused)
            try:
                pf = await self.upload.open_packed(chunk, f) \
                    if accept_zstd and self.upload.compress else None
                with pf if pf is not None else contextlib.nullcontext():
                    async with self.turn.hold(priority):
                        await self._send(request, chunk, pf or f, pf is not None)
            finally:
                self.upload.release(self.remote)

    async def _send(self, request: int, chunk: str, f: BinaryIO, packed: bool) -> None:
        length = os.fstat(f.fileno()).st_size
        writer = self.writer
        transport = writer.transport
        loop = asyncio.get_running_loop()
        writer.write(frames.header(frames.PIECE, request, length, frames.OK,
                                   frames.ZSTD if packed else frames.RAW))

        async def write(part: memoryview) -> None:
            writer.write(part)
            await writer.drain()

        async def sendfile(f: BinaryIO, offset: int, n: int) -> None:
            if transport.is_closing():
                raise ConnectionResetError("the child went away")
            await loop.sendfile(transport, f, offset, n)

        try:
            sent = await self.upload.body(transport, f, length, write, sendfile)
        except ConnectionError as e:
            cut_off(transport)
            raise _CutOff(f"upload of {chunk} broken: {e!r}") from e
        if not sent:
            log.info("upload of %s to %s cut off: below %s/s for %.0f s", chunk, self.remote,
                     format_size(self.upload.min_rate or 0), STALL_WINDOW)
            cut_off(transport)
            raise _CutOff("below the minimum rate")
        log.debug("uploaded %s to %s (framed)", chunk, self.remote)
        self.upload.uploaded_piece(length)
