"""Passing a request to the upstream registry unchanged: method, headers (Authorization
included), status, body, streamed both ways. Used for everything the mirror does not serve
peer-to-peer: `/v2/`, manifests by tag, tags lists, token realms, and refusals of blobs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web

log = logging.getLogger("naiad.peer.proxy")

# RFC 9110 §7.6.1 connection-specific fields, plus what the transport recomputes.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
))
_MIRROR_HEADERS = frozenset(("x-dragonfly-registry", "x-dragonfly-priority",
                             "x-dragonfly-use-p2p", "x-dragonfly-prefetch"))


def forwardable(headers: object, drop: frozenset[str] = frozenset()) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers.items():  # type: ignore[attr-defined]
        low = k.lower()
        if low in HOP_BY_HOP or low in drop:
            continue
        out[k] = v if k not in out else f"{out[k]}, {v}"
    return out


def relative_to(base: str) -> Callable[[str], str]:
    """A `Location` on `base` made relative, so a client that follows it comes back here (a
    model hub's redirect within itself, say); anywhere else is left alone."""
    def rewrite(location: str) -> str:
        if location.startswith(base + "/"):
            return location[len(base):]
        return location
    return rewrite


async def passthrough(request: web.Request, session: aiohttp.ClientSession,
                      url: str, location: Callable[[str], str] | None = None
                      ) -> web.StreamResponse:
    """`location`, when given, rewrites the upstream's `Location` header."""
    headers = forwardable(request.headers, _MIRROR_HEADERS)
    body = request.content if request.body_exists else None
    try:
        upstream = await session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60))
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        log.warning("upstream %s unreachable: %r", url, e)
        return web.json_response({"error": f"upstream unreachable: {e!r}"}, status=502)
    async with upstream:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=forwardable(upstream.headers))
        if location is not None and "Location" in resp.headers:
            resp.headers["Location"] = location(resp.headers["Location"])
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        await resp.prepare(request)
        if request.method != "HEAD":
            try:
                async for part in upstream.content.iter_chunked(256 << 10):
                    await resp.write(part)
            except ConnectionResetError:
                raise  # the client went away (a write to its connection): the mirror's line
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError,
                    TimeoutError) as e:
                # Headers are out: end the connection, so the client sees a broken body and
                # never a short one that looks whole.
                log.warning("upstream %s cut off mid-body: %r", url, e)
                if request.transport is not None:
                    request.transport.abort()
                return resp
        await resp.write_eof()
        return resp


class _Tunnel(asyncio.Protocol):
    """The client side of a CONNECT tunnel, once its transport left aiohttp: bytes from the
    client go upstream, with flow control both ways."""

    def __init__(self, client: asyncio.Transport, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self._draining: asyncio.Task[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.upstream.write(data)
        if self.upstream.transport.get_write_buffer_size() > TUNNEL_BUFFER:
            self.client.pause_reading()  # until the upstream drains: one drain at a time
            self._draining = asyncio.create_task(self._resume_after_drain())

    async def _resume_after_drain(self) -> None:
        try:
            await self.upstream.drain()
        except ConnectionError:
            self.client.close()
            return
        if not self.client.is_closing():
            self.client.resume_reading()

    def eof_received(self) -> bool:
        if self.upstream.can_write_eof():
            self.upstream.write_eof()
        return True

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if self._draining is not None:
            self._draining.cancel()
        self.upstream.close()
        if not self.closed.done():
            self.closed.set_result(None)


TUNNEL_BUFFER = 1 << 20


async def tunnel(request: web.Request, host: str, port: int) -> web.StreamResponse:
    """Answer a CONNECT by relaying raw bytes to host:port (TLS end to end: no P2P, no cache).

    The connection leaves aiohttp once the 200 is written: its transport gets a protocol of
    our own, and this handler returns only when the tunnel is closed."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, TimeoutError) as e:
        return web.json_response({"error": f"cannot reach {host}:{port}: {e!r}"}, status=502)
    transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    relay = _Tunnel(transport, writer)
    transport.set_protocol(relay)

    async def downstream() -> None:
        try:
            while data := await reader.read(1 << 16):
                await relay.writable.wait()
                if transport.is_closing():
                    break
                transport.write(data)
        except ConnectionError:
            pass
        finally:
            if not transport.is_closing():
                transport.close()

    down = asyncio.create_task(downstream())
    try:
        await relay.closed
    finally:
        down.cancel()
        writer.close()
    return web.Response()  # never written: the transport is closed
