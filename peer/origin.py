"""Fetching from the origin: probing a blob's size and access, and ranged reads.

The peer follows registry redirects (307 to object storage) itself: the redirect target is
requested without the client's Authorization (it is signed) and remembered for a while, so a
blob's range reads do not each bounce through the registry. A remembered target that stops
working (an expired signature) is forgotten and the registry asked again.

A redirect is never a way into the peer's own network: a target whose address is not global
(loopback, private, link-local, ...) is followed only when its host is allow-listed or is the
registry's own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from common.limits import DEFAULT, Paced, PrioritySlots, TokenBucket

REDIRECT_TTL = 600.0
MAX_REDIRECTS = 5
# An origin that sends no byte for this long is abandoned (the piece is asked for again, and by
# then another peer may hold it or have taken over the lease). Generous for a registry or a
# signed object-store URL; short enough that a hung connection does not hang a pull.
ORIGIN_STALL_SECONDS = 10.0
_REDIRECT_CODES = {301, 302, 303, 307, 308}


@dataclass(frozen=True, slots=True)
class OriginRequest:
    """Where a blob comes from and with whose credentials."""

    url: str
    registry: str  # scheme://host, the key for per-registry concurrency
    authorization: str | None = None


@dataclass(slots=True)
class Probe:
    """What the origin said about a blob: its length when readable, else its refusal."""

    status: int
    length: int | None = None
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.length is not None


class OriginError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OriginClient:
    def __init__(self, session: aiohttp.ClientSession, concurrency: int = 4,
                 read_timeout: float = ORIGIN_STALL_SECONDS,
                 allowed: Callable[[str], bool] = lambda _: False,
                 rate: TokenBucket | None = None) -> None:
        self.session = session
        self.rate = rate  # --origin-rate: blob bytes from origins, all registries together
        self.allowed = allowed
        self.concurrency = concurrency
        self.read_timeout = read_timeout
        self._slots: dict[str, PrioritySlots] = {}
        self._redirects: dict[str, tuple[float, str]] = {}

    def _slot(self, registry: str) -> PrioritySlots:
        slots = self._slots.get(registry)
        if slots is None:
            slots = self._slots[registry] = PrioritySlots(self.concurrency)
        return slots

    def _remembered(self, url: str) -> str | None:
        hit = self._redirects.get(url)
        if hit is None or hit[0] < time.monotonic():
            self._redirects.pop(url, None)
            return None
        return hit[1]

    @contextlib.asynccontextmanager
    async def _request(self, method: str, req: OriginRequest,
                       headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request that follows redirects the way registry clients do."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout)
        target = self._remembered(req.url)
        if target is not None:
            resp = await self.session.request(method, target, headers=headers,
                                              allow_redirects=False, timeout=timeout)
            if resp.status < 400:
                try:
                    yield resp
                finally:
                    resp.release()
                return
            resp.release()
            self._redirects.pop(req.url, None)
        url, auth = req.url, req.authorization
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth:
                h["Authorization"] = auth
            resp = await self.session.request(method, url, headers=h, allow_redirects=False,
                                              timeout=timeout)
            location = resp.headers.get("Location")
            if resp.status in _REDIRECT_CODES and location:
                resp.release()
                target = urljoin(url, location)
                await self._check_redirect(url, target)
                url = target
                auth = None  # signed URLs carry their own credentials
                if method == "GET":
                    self._redirects[req.url] = (time.monotonic() + REDIRECT_TTL, url)
                continue
            try:
                yield resp
            finally:
                resp.release()
            return
        raise OriginError(f"too many redirects for {req.url}")

    async def _check_redirect(self, source: str, target: str) -> None:
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OriginError(f"redirect to {target[:200]!r} refused: not http(s)")
        if parts.username is not None or parts.password is not None:
            raise OriginError("redirect refused: the target carries userinfo")
        if self.allowed(parts.netloc):
            return
        mine = await _addresses(urlsplit(source).hostname or "")
        for address in await _addresses(parts.hostname):
            if not address.is_global and address not in mine:
                raise OriginError(f"redirect to internal address {address} refused")

    async def probe(self, req: OriginRequest) -> Probe:
        """HEAD the blob with the client's credentials. When the answer carries no length (or a
        redirect target refuses HEAD, as presigned GET URLs do), ask for its first byte."""
        async with self._request("HEAD", req, {}) as resp:
            length = resp.headers.get("Content-Length")
            if resp.status >= 300 and resp.status not in (403, 405):
                return Probe(resp.status, None, CIMultiDict(resp.headers))
            if resp.status < 300 and length is not None and length.isdigit():
                return Probe(resp.status, int(length), CIMultiDict(resp.headers))
        async with self._request("GET", req, {"Range": "bytes=0-0"}) as resp:
            headers = CIMultiDict(resp.headers)
            if resp.status == 206:
                total = headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit():
                    return Probe(resp.status, int(total), headers)
            if resp.status == 200 and headers.get("Content-Length", "").isdigit():
                return Probe(resp.status, int(headers["Content-Length"]), headers)
            if resp.status == 416:  # an empty blob has no first byte
                return Probe(200, 0, headers)
            return Probe(resp.status if resp.status >= 300 else 502, None, headers)

    @contextlib.asynccontextmanager
    async def open_range(self, req: OriginRequest, start: int, end: int,
                         priority: int = DEFAULT) -> AsyncIterator[Paced]:
        """A stream of exactly bytes start..end (inclusive) of the blob; at most
        `concurrency` per registry, the most urgent first."""
        async with self._slot(req.registry).hold(priority), \
                self._request("GET", req, {"Range": f"bytes={start}-{end}"}) as resp:
            if resp.status == 206:
                got = resp.headers.get("Content-Range", "")
                if not got.startswith(f"bytes {start}-{end}/"):
                    raise OriginError(f"origin answered range {got!r} for {start}-{end}")
            elif resp.status == 200:
                # The origin ignored the Range: skip to the start (correct, if wasteful).
                remaining = start
                while remaining:
                    skipped = await resp.content.read(min(remaining, 1 << 20))
                    if not skipped:
                        raise OriginError("origin body ended before the requested range")
                    remaining -= len(skipped)
            else:
                raise OriginError(f"origin answered {resp.status} for {req.url}", resp.status)
            yield Paced(resp.content, self.rate)


async def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address a host name resolves to (an IP literal is its own)."""
    try:
        return {ipaddress.ip_address(host.strip("[]"))}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError as e:
        raise OriginError(f"cannot resolve {host!r}: {e}") from e
    return {ipaddress.ip_address(info[4][0]) for info in infos}
