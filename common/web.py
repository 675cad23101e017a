"""aiohttp helpers shared by every server: JSON bodies through the wire models, errors as JSON
with a reason, readiness, files by sendfile, and running an app on a host:port."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import BinaryIO, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

log = logging.getLogger("naiad.http")
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class RequestError(Exception):
    """Raised by cores and handlers for a request we refuse; becomes a JSON 4xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def parse_body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                    for err in e.errors()[:10]]
        raise RequestError(400, "invalid request body: " + "; ".join(problems)) from None


def model_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json(), status=status,
                        content_type="application/json")


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as e:
        return error(e.status, e.message)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        return error(e.status, e.reason)
    except json.JSONDecodeError as e:
        return error(400, f"invalid JSON: {e}")


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


class Server:
    """One aiohttp app bound to one address, with an explicit start/stop."""

    def __init__(self, app: web.Application, listen: str,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.host, self.port = split_listen(listen)
        self.ssl_context = ssl_context
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                           reuse_address=True, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the real port when asked for port 0

    @property
    def address(self) -> str:
        return join_hostport(self.host, self.port)

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.address}"

    async def stop(self) -> None:
        await self._runner.cleanup()
