"""The framed transport's child side: a chunk from a parent over a persistent connection.

A pool per parent address of at most CONNECTIONS connections, requests multiplexed on them,
at most the parent's window (its per-address upload slots, from WELCOME) in flight to it at
once: a request beyond waits up to WINDOW_PATIENCE, then is `busy` without a round trip, as
the parent itself would have answered. Each answer is received straight into a buffer of the
piece's size (`asyncio.BufferedProtocol`: recv_into, no joins), reused once nothing refers to
it any more (peer/p2p/buffers.py). No byte for the stall timeout (peer/parents.py `Patience`,
shared with the HTTP path's) while requests are pending fails them `slow` and drops the
connection; a connection that dies
fails only the requests in flight on it (`failed`), and the next request dials again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from dataclasses import dataclass, field

from common.flight import SingleFlight
from common.limits import DEFAULT, PrioritySlots, TokenBucket
from common.log import request_id as current_request_id
from common.models import split_hostport
from peer.p2p import frames
from peer.p2p.buffers import Buffers
from peer.parents import STALL_SECONDS, ParentError, Patience, unpack

log = logging.getLogger("naiad.peer.parents")
PACED_RECEIVE = 64 << 10  # the most one receive takes under --download-rate
CONNECTIONS = 2  # per parent: a second one once the first has requests queued
SPREAD = 2  # requests in flight on a connection before a second is dialled
WINDOW_PATIENCE = 0.05  # about the engine's own back-off after a busy answer
IDLE_SECONDS = 5.0  # a connection unused this long is closed (parents close theirs at 10)


@dataclass(slots=True)
class _Request:
    size: int
    answer: asyncio.Future[tuple[int, int, bytearray]]
    started: bool = False  # bytes of its answer arrived


@dataclass(slots=True)
class _Reading:
    """The frame whose body is being received: into `buffer`, `got` bytes so far."""
    frame: frames.Frame
    buffer: bytearray
    view: memoryview
    got: int = 0
    request: _Request | None = None


class _Lost(ParentError):
    """A connection died; `retry`: before any byte of this answer, on a connection that had
    answered before (the parent may have closed it as idle just as the request went)."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__("failed", message)
        self.retry = retry


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.welcome: asyncio.Future[int] = self.loop.create_future()
        self.pending: dict[int, _Request] = {}
        self.ids = itertools.count(1)
        self.head = bytearray(frames.HEADER.size)
        self.head_view = memoryview(self.head)
        self.head_got = 0
        self.reading: _Reading | None = None
        self.answered = 0
        self.error: ParentError | None = None
        self.last = self.loop.time()  # of the last byte received, or of becoming busy
        self.paused = False  # by --download-rate
        self._stall: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return self.error is None and self.welcome.done() and not self.welcome.exception()

    # -- requests (called by the pool) ---------------------------------------------------------

    async def fetch(self, chunk: str, size: int,
                    priority: int) -> tuple[int, int, bytearray]:
        assert self.transport is not None
        if self.error is not None:
            raise self.error
        request_id = next(self.ids) & 0xFFFFFFFF
        request = _Request(size, self.loop.create_future())
        if not self.pending:
            self.last = self.loop.time()
            self._arm()
        self.pending[request_id] = request
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.transport.write(frames.request(request_id, chunk, size, priority,
                                            self.pool.compress, current_request_id.get()))
        # Cancelled, the request stays pending: its answer still arrives and is read.
        return await request.answer

    def close(self) -> None:
        self._fail(ParentError("failed", "closed"))

    def _close_idle(self) -> None:
        self.close()
        self.pool.buffers.release()  # a quiet child keeps no idle piece buffers

    # -- asyncio.BufferedProtocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.reading is not None:
            view = self.reading.view[self.reading.got:]
            # Paced, bytes are paid for after they arrive: small receives keep the unpaid
            # last one small (one receive of a whole piece let a pull beat --download-rate).
            return view[:PACED_RECEIVE] if self.pool.rate is not None else view
        return self.head_view[self.head_got:]

    def buffer_updated(self, nbytes: int) -> None:
        self.last = self.loop.time()
        rate = self.pool.rate
        if rate is not None:
            wait = rate.delay(nbytes)
            if wait > 0 and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
                self.loop.call_later(wait, self._resume)
        try:
            reading = self.reading
            if reading is None:
                self.head_got += nbytes
                if self.head_got == len(self.head):
                    self.head_got = 0
                    self._begin(frames.parse_header(self.head))
            else:
                reading.got += nbytes
                if reading.request is not None:
                    reading.request.started = True
                if reading.got == len(reading.buffer):
                    self._end(reading)
        except (frames.FrameError, ParentError) as e:
            self._fail(e if isinstance(e, ParentError) else
                       ParentError("failed", f"{self.pool.addr}: {e}"))

    def eof_received(self) -> bool | None:
        return None  # close: answers come whole or not at all

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"{self.pool.addr} closed the connection" + (f": {exc!r}" if exc else "")
        self._fail(ParentError("failed", why), lost=True)

    # -- frames --------------------------------------------------------------------------------

    def _begin(self, frame: frames.Frame) -> None:
        request = None
        if frame.kind == frames.PIECE:
            if not self.welcome.done():
                raise frames.FrameError("PIECE before WELCOME")
            request = self.pending.get(frame.request)
            if request is None:
                raise frames.FrameError(f"an answer to request {frame.request}, not asked")
            if frame.status == frames.OK:
                limit = frames.piece_limit(request.size, frame.encoding)
                if frame.encoding == frames.ZSTD and not self.pool.compress:
                    raise frames.FrameError("a compressed piece, not accepted")
                if frame.length > limit or \
                        (frame.encoding == frames.RAW and frame.length != request.size):
                    raise ParentError("failed", f"{self.pool.addr} offers {frame.length} "
                                                f"bytes, piece has {request.size}")
        elif frame.kind not in (frames.WELCOME, frames.ERROR):
            raise frames.FrameError(f"frame kind {frame.kind} from a parent")
        # A whole raw piece goes into a reused buffer (peer/p2p/buffers.py); the rest is small
        # or about to be unpacked.
        raw = frame.kind == frames.PIECE and frame.status == frames.OK \
            and frame.encoding == frames.RAW
        buffer = self.pool.buffers.take(frame.length) if raw else bytearray(frame.length)
        self.reading = _Reading(frame, buffer, memoryview(buffer), request=request)
        if not frame.length:
            self._end(self.reading)

    def _end(self, reading: _Reading) -> None:
        self.reading = None
        frame = reading.frame
        if frame.kind == frames.WELCOME:
            if not self.welcome.done():
                self.welcome.set_result(frames.parse_welcome(bytes(reading.buffer)))
            return
        if frame.kind == frames.ERROR:
            reason = reading.buffer.decode("utf-8", "replace")
            raise ParentError("failed", f"{self.pool.addr} refused: {reason}")
        request = self.pending.pop(frame.request)
        self.answered += 1
        if not request.answer.done():
            request.answer.set_result((frame.status, frame.encoding, reading.buffer))
        if not self.pending:
            self._disarm()
            self._idle = self.loop.call_later(IDLE_SECONDS, self._close_idle)

    def _fail(self, error: ParentError, lost: bool = False) -> None:
        if self.error is None:
            self.error = error
        self._disarm()
        if self._idle is not None:
            self._idle.cancel()
        if not self.welcome.done():
            self.welcome.set_exception(error)
            self.welcome.exception()  # retrieved: the dialler raises its own
        answering = self.reading.request if self.reading is not None else None
        for request in self.pending.values():
            if not request.answer.done():
                retry = lost and self.answered > 0 and not request.started \
                    and request is not answering
                request.answer.set_exception(_Lost(str(error), retry)
                                             if error.kind == "failed" else error)
        self.pending.clear()
        self.pool.forget(self)
        if self.transport is not None and not lost:
            self.transport.abort()

    # -- timers --------------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._stall is None:
            self._stall = self.loop.call_later(self.pool.patience.seconds(self.loop.time()),
                                               self._check)

    def _disarm(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _check(self) -> None:
        self._stall = None
        if not self.pending:
            return
        now = self.loop.time()
        quiet, patience = now - self.last, self.pool.patience.seconds(now)
        if not self.paused and quiet >= patience:
            self._fail(ParentError("slow", f"{self.pool.addr} stalled"))
            return
        self._stall = self.loop.call_later(max(0.01, patience - quiet), self._check)

    def _resume(self) -> None:
        self.paused = False
        self.last = self.loop.time()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


@dataclass
class _Pool:
    addr: str  # host:port, or https://host:port
    secret: bytes | None
    tls: ssl.SSLContext | None
    compress: bool
    rate: TokenBucket | None
    patience: Patience
    buffers: Buffers
    limit: int = CONNECTIONS
    connections: list[_Connection] = field(default_factory=list)
    window: PrioritySlots | None = None
    dials: SingleFlight[str, _Connection] = field(default_factory=SingleFlight)

    async def fetch(self, chunk: str, size: int, priority: int) -> bytes:
        for attempt in (1, 2):
            connection = await self._connection()
            window = self.window
            assert window is not None
            if not window.try_acquire(priority):  # no room at once: wait, but not long
                try:
                    async with asyncio.timeout(WINDOW_PATIENCE):
                        await window.acquire(priority)
                except TimeoutError:
                    raise ParentError("busy", f"{self.addr}: its window is full") from None
            try:
                if not connection.usable:  # lost while we waited
                    connection = await self._connection()
                status, encoding, data = await connection.fetch(chunk, size, priority)
            except _Lost as e:
                if e.retry and attempt == 1:
                    continue
                raise
            finally:
                self.window.release()  # a window resized meanwhile carries the count over
            piece = await _answer(self.addr, size, status, encoding, data)
            self.patience.received(size, asyncio.get_running_loop().time())
            return piece
        raise AssertionError("unreachable")

    async def _connection(self) -> _Connection:
        live = [c for c in self.connections if c.usable]
        best = min(live, key=lambda c: len(c.pending), default=None)
        if best is not None and (len(best.pending) < SPREAD or len(live) >= self.limit
                                 or self.addr in self.dials):
            return best
        return await self.dials.run(self.addr, self._dial)

    async def _dial(self) -> _Connection:
        host, port = split_hostport(self.addr)
        tls = self.addr.startswith("https://")
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        patience = self.patience.seconds(loop.time())
        try:
            async with asyncio.timeout(patience):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self), host, port,
                    ssl=(self.tls or ssl.create_default_context()) if tls else None,
                    server_hostname=host if tls else None)
                assert connection.transport is not None
                connection.transport.write(frames.hello(self.secret))
                window = await connection.welcome
        except BaseException as e:
            if connection is not None:  # half made: not left to the parent's idle timeout
                connection.close()
            if isinstance(e, TimeoutError):
                raise ParentError("slow", f"{self.addr}: no WELCOME in "
                                          f"{patience:.2f} s") from e
            if isinstance(e, OSError):  # refused, reset, TLS refused (SSLError is an OSError)
                raise ParentError("failed", f"{self.addr}: {e!r}") from e
            raise
        if self.window is None or self.window.slots != window:
            self.window = _resized(self.window, window)
        self.connections.append(connection)
        return connection

    def forget(self, connection: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(connection)

    def close(self) -> None:
        for connection in list(self.connections):
            connection.close()


def _resized(window: PrioritySlots | None, slots: int) -> PrioritySlots:
    """A window of `slots`, keeping the count of requests in flight through the old one."""
    new = PrioritySlots(slots)
    if window is not None:
        new.busy = window.busy
    return new


async def _answer(addr: str, size: int, status: int, encoding: int,
                  data: bytearray) -> bytes:
    if status == frames.BUSY:
        raise ParentError("busy", f"{addr} has no free upload slot")
    if status != frames.OK:
        reason = data.decode("utf-8", "replace")
        what = "missing" if status == frames.MISSING else "failed"
        raise ParentError("failed", f"{addr}: {what}: {reason}")
    if encoding == frames.ZSTD:
        return await unpack(bytes(data), size, addr)
    return data  # type: ignore[return-value]  # a bytearray of the piece: bytes-like


class FramedClient:
    """A `ChunkSource` over the framed transport (peer/parents.py routes parents that
    registered transport 2 here)."""

    def __init__(self, secret: bytes | None = None, stall_seconds: float = STALL_SECONDS,
                 compress: bool = True, rate: TokenBucket | None = None,
                 tls: ssl.SSLContext | None = None, connections: int = CONNECTIONS,
                 patience: Patience | None = None) -> None:
        self.secret = secret
        self.patience = patience if patience is not None else Patience(stall_seconds)
        self.compress = compress
        self.rate = rate  # --download-rate: shared with the HTTP path's
        self.tls = tls
        self.connections = connections
        self._pools: dict[str, _Pool] = {}
        self.buffers = Buffers()  # shared by every parent's connections

    async def fetch(self, addr: str, chunk: str, size: int, priority: int = DEFAULT) -> bytes:
        pool = self._pools.get(addr)
        if pool is None:
            pool = self._pools[addr] = _Pool(addr, self.secret, self.tls, self.compress,
                                             self.rate, self.patience, self.buffers,
                                             self.connections)
        return await pool.fetch(chunk, size, priority)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
