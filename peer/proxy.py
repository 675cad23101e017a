"""Passing a request to the upstream registry unchanged: method, headers (Authorization
included), status, body, streamed both ways. Used for everything the mirror does not serve
peer-to-peer: `/v2/`, manifests by tag, tags lists, token realms, and refusals of blobs."""

from __future__ import annotations

import logging

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


async def passthrough(request: web.Request, session: aiohttp.ClientSession,
                      url: str) -> web.StreamResponse:
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
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        await resp.prepare(request)
        if request.method != "HEAD":
            async for part in upstream.content.iter_chunked(256 << 10):
                await resp.write(part)
        await resp.write_eof()
        return resp
