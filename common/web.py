"""aiohttp helpers shared by every server: JSON bodies through the wire models, errors as JSON
with a reason, readiness, files by sendfile, and running an app on a host:port with bounds on
what one client may hold (`ClientLimits`)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from common.limits import PerAddress, Throttle

log = logging.getLogger("naiad.http")
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(message: str, **extra: object) -> bytes:
    """The JSON of a refusal, `{"error": ..., **extra}`: what `error` sends, as bytes for a
    transport that is not aiohttp's (the scheduler's framed calls)."""
    return json.dumps({"error": message, **extra}).encode()


def error(status: int, message: str, **extra: object) -> web.Response:
    return web.Response(body=error_body(message, **extra), status=status,
                        content_type="application/json", charset="utf-8")


def unavailable(message: str) -> web.Response:
    """503 with a reason and `Retry-After: 1`: busy or stopping for now, ask again shortly."""
    resp = error(503, message)
    resp.headers["Retry-After"] = "1"
    return resp


class RequestError(Exception):
    """Raised by cores and handlers for a request we refuse; becomes a JSON 4xx."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code  # for clients to act on: common.models' error codes


async def parse_body(request: web.Request, model: type[M]) -> M:
    return parse_json(await request.read(), model)


def parse_json(raw: bytes, model: type[M]) -> M:
    """A request body through its wire model; RequestError(400) naming what is wrong."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                    for err in e.errors()[:10]]
        raise RequestError(400, "invalid request body: " + "; ".join(problems)) from None


def model_response(model: BaseModel, status: int = 200) -> web.Response:
    # Bytes, not the str: aiohttp sends bytes as they are, a str through its payload registry
    # (~4 us more per response, measured on the scheduler's hot calls).
    return web.Response(body=model.model_dump_json().encode(), status=status,
                        content_type="application/json")


# What `as_json` answers for; anything else goes on up.
ANSWERED = (RequestError, web.HTTPException, json.JSONDecodeError)


def refused(e: RequestError) -> web.Response:
    return error(e.status, e.message, **({"code": e.code} if e.code else {}))


def as_json(e: Exception) -> web.Response | None:
    """The JSON error a refused request is answered with (one of `ANSWERED`); None when `e`
    must go on up as it is (a redirect, or an HTTP error that already is JSON)."""
    if isinstance(e, RequestError):
        return refused(e)
    if isinstance(e, web.HTTPException):
        if e.status < 400 or e.content_type == "application/json":
            return None
        return error(e.status, e.reason)
    return error(400, f"invalid JSON: {e}")


def done() -> web.Response:
    """`{}`: a call that answers nothing but that it was done, as json_response({}) sends it
    without encoding it each time."""
    return web.Response(body=b"{}", content_type="application/json", charset="utf-8")


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ANSWERED as e:
        answer = as_json(e)
        if answer is None:
            raise
        return answer


async def bodiless(request: web.Request, status: int, headers: dict[str, str],
                   length: int) -> web.StreamResponse:
    """A response with a Content-Length but no body: for HEAD, and empty entities."""
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    await resp.prepare(request)
    await resp.write_eof()
    return resp


async def send_file(request: web.BaseRequest, f: BinaryIO, offset: int, count: int) -> None:
    """`count` bytes of an open file from `offset` straight to the client's socket (kernel
    sendfile), after the prepared response's headers. Local chunk files are opened on the loop:
    an open is microseconds, a hop to a worker thread (aiohttp's FileResponse) costs more."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    await asyncio.get_running_loop().sendfile(transport, f, offset, count)


async def healthy(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_hostport(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client may hold on a server. `header_timeout`: seconds a connection has to
    send complete request headers, from connecting (TLS handshake included) or from the end
    of its previous response — idle keep-alive ends there too. `per_address`: connections one
    remote address may hold at once; the excess is closed at once. On one host every peer
    shares 127.0.0.1, and a peer keeps up to 32 piece fetches in flight, hence 512."""

    header_timeout: float = 10.0
    per_address: int = 512


ACCEPT_ERROR = "socket.accept() out of system resource"
REPORT_EVERY = 10.0  # seconds between two log lines about the same kind of refusal


class Sniffed(Protocol):
    """A second protocol on a server's port, told apart from HTTP by the first bytes a client
    sends (`preface`; an HTTP request never starts with it)."""

    preface: bytes

    def protocol(self) -> asyncio.Protocol: ...

    async def close(self) -> None: ...


class _Counted(asyncio.Protocol):
    """One connection, counted against its remote address: over the cap it is closed before
    aiohttp ever sees it; otherwise every event goes to aiohttp's handler — or, on a server
    with a `Sniffed` protocol, to that one if the connection opens with its preface. Until the
    first bytes tell, the header deadline runs here."""

    __slots__ = ("_address", "_buffer", "_inner", "_made", "_server", "_sniffing",
                 "_transport")

    def __init__(self, inner: asyncio.Protocol, server: Server) -> None:
        self._inner = inner
        self._server = server
        self._address: str | None = None
        self._made = False
        self._buffer = b""
        self._sniffing: asyncio.TimerHandle | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        if not self._server.connections.admit(address):
            transport.abort()
            self._server.refused(address)
            return
        self._address = address
        if self._server.sniffed is None:
            self._made = True
            self._inner.connection_made(transport)
            return
        self._transport = transport
        self._sniffing = asyncio.get_running_loop().call_later(
            self._server.limits.header_timeout, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sniffing is not None:
            self._sniffing.cancel()
            self._sniffing = None
        if self._address is not None:
            self._server.connections.release(self._address)
            self._address = None
            if self._made:
                self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._made:
            self._inner.data_received(data)
            return
        sniffed, transport = self._server.sniffed, self._transport
        assert sniffed is not None and transport is not None
        self._buffer += data
        preface = sniffed.preface
        if len(self._buffer) < len(preface) and preface.startswith(self._buffer):
            return  # not told yet
        data, self._buffer = self._buffer, b""
        if self._sniffing is not None:
            self._sniffing.cancel()
            self._sniffing = None
        if data.startswith(preface):
            self._inner = sniffed.protocol()
            data = data[len(preface):]
        self._made = True
        self._inner.connection_made(transport)
        if data:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._made else None

    def pause_writing(self) -> None:
        if self._made:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._made:
            self._inner.resume_writing()


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Out of descriptors, asyncio logs a traceback for every failed accept() — hundreds per
    tick, megabytes a second. Keep that to one plain line per REPORT_EVERY seconds."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_accept_errors", False):
        return
    throttle = Throttle(REPORT_EVERY)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        dropped = throttle.ready()
        if dropped is not None:
            log.warning("accept() failed: %s (%d more like it not logged)",
                        context.get("exception"), dropped)

    handler.quiets_accept_errors = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


class Server:
    """One aiohttp app bound to one address, with an explicit start/stop and `ClientLimits`;
    with `sniffed`, a second protocol on the same port (the peers' framed transport)."""

    def __init__(self, app: web.Application, listen: str,
                 ssl_context: ssl.SSLContext | None = None,
                 limits: ClientLimits | None = None, sniffed: Sniffed | None = None) -> None:
        self.app = app
        self.sniffed = sniffed
        self.host, self.port = split_listen(listen)
        self.ssl_context = ssl_context
        self.limits = limits or ClientLimits()
        self.connections = PerAddress(self.limits.per_address)
        self._refusals = Throttle(REPORT_EVERY)
        # aiohttp's keep-alive timer runs from the connection's start and from each response's
        # end, and closes a connection still waiting for a complete request: the header
        # deadline.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0,
                                     keepalive_timeout=self.limits.header_timeout)
        self._listener: asyncio.Server | None = None

    async def start(self) -> None:
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop)
        handlers = self._runner.server
        assert handlers is not None
        self._listener = await loop.create_server(
            lambda: _Counted(handlers(), self), self.host, self.port, ssl=self.ssl_context,
            backlog=1024, reuse_address=True,
            ssl_handshake_timeout=self.limits.header_timeout if self.ssl_context else None)
        self.port = self._listener.sockets[0].getsockname()[1]  # the real port for port 0

    def refused(self, address: str) -> None:
        dropped = self._refusals.ready()
        if dropped is not None:
            log.warning("%s: %s already holds %d connections; closed a new one (%d more "
                        "refusals not logged)", self.address, address,
                        self.limits.per_address, dropped)

    @property
    def address(self) -> str:
        return join_hostport(self.host, self.port)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.address}"

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
        if self.sniffed is not None:
            await self.sniffed.close()
        await self._runner.cleanup()
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
