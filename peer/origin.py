"""Fetching from the origin: probing a blob's size and access, and ranged reads.

The peer follows registry redirects (307 to object storage) itself: the redirect target is
requested without the client's Authorization (it is signed) and remembered for a while per
(URL, credential), so a blob's range reads do not each bounce through the registry. A
remembered target that stops working (an expired signature) is forgotten and the registry asked
again. An access probe never uses a remembered target: it always asks the registry with this
client's credential, since a signed storage URL would answer anyone.

A redirect is never a way into the peer's own network: a target whose address is not global
(loopback, private, link-local, ...) is followed only when its host:port is allow-listed or is
the redirecting server's own address and port. The name is resolved once, checked, and the
connection made to exactly the checked address (no DNS rebinding between check and connect).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from multidict import CIMultiDict
from yarl import URL

from common.limits import DEFAULT, Paced, PrioritySlots, TokenBucket

log = logging.getLogger("naiad.peer.origin")

REDIRECT_TTL = 600.0
_REDIRECTS_MAX = 10_000
MAX_REDIRECTS = 5
# An origin that sends no byte for this long is abandoned (the piece is asked for again, and by
# then another peer may hold it or have taken over the lease). Generous for a registry or a
# signed object-store URL; short enough that a hung connection does not hang a pull.
ORIGIN_STALL_SECONDS = 10.0
_REDIRECT_CODES = {301, 302, 303, 307, 308}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[Address, int]


def credential_key(authorization: str | None) -> str:
    """What names a credential in a cache key: its hash, never the credential itself."""
    return hashlib.sha256((authorization or "").encode("utf-8", "surrogateescape")).hexdigest()


def _unmapped(address: Address) -> Address:
    # ::ffff:a.b.c.d reaches a.b.c.d: judge it as that address.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def redirect_refusal(addresses: Iterable[Address], port: int,
                     own: set[Endpoint]) -> str | None:
    """Why a redirect to `port` on these addresses is refused, or None. An address that is not
    global must be the registry's own, port included (another port there is another server)."""
    for address in map(_unmapped, addresses):
        if not address.is_global and (address, port) not in own:
            return f"redirect to internal address {address} port {port} refused"
    return None


def pinned(url: str, address: Address) -> tuple[URL, str, str | None]:
    """How to reach `url` at exactly `address`: the URL with its host replaced by the address,
    the Host header the server expects, and the name a TLS certificate must match."""
    u = URL(url)
    host = u.host_port_subcomponent
    assert host is not None and u.raw_host is not None
    return u.with_host(str(address)), host, u.raw_host if u.scheme == "https" else None


def _port(url: str) -> int:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as e:
        raise OriginError(f"invalid port in {url[:200]!r}") from e
    return port or (443 if parts.scheme == "https" else 80)


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
                 rate: TokenBucket | None = None,
                 resolver: AbstractResolver | None = None) -> None:
        self.session = session
        self.rate = rate  # --origin-rate: blob bytes from origins, all registries together
        self.allowed = allowed
        self.concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout)
        # Resolves redirect targets for their check; the connection then goes to the address
        # checked, never to a second answer.
        self.resolver = resolver or ThreadedResolver()
        self._slots: dict[str, PrioritySlots] = {}
        # (registry URL, credential key) -> (expiry, the target it redirected that client to)
        self._redirects: dict[tuple[str, str], tuple[float, str]] = {}

    def _slot(self, registry: str) -> PrioritySlots:
        slots = self._slots.get(registry)
        if slots is None:
            slots = self._slots[registry] = PrioritySlots(self.concurrency)
        return slots

    def queued(self, registry: str, priority: int) -> float:
        """How long a request of at least `priority` has waited for a connection to `registry`
        (0.0: none waits): this peer's origin capacity there is exhausted for such work."""
        slots = self._slots.get(registry)
        return slots.waited(priority) if slots is not None else 0.0

    def _remembered(self, key: tuple[str, str]) -> str | None:
        hit = self._redirects.get(key)
        if hit is None or hit[0] < time.monotonic():
            self._redirects.pop(key, None)
            return None
        return hit[1]

    def _remember(self, key: tuple[str, str], target: str) -> None:
        if len(self._redirects) >= _REDIRECTS_MAX:
            now = time.monotonic()
            self._redirects = {k: v for k, v in self._redirects.items() if v[0] > now}
            while len(self._redirects) >= _REDIRECTS_MAX:
                del self._redirects[next(iter(self._redirects))]
        self._redirects[key] = (time.monotonic() + REDIRECT_TTL, target)

    async def _send(self, method: str, url: str, pin: Address | None,
                    headers: dict[str, str]) -> aiohttp.ClientResponse:
        if pin is None:
            return await self.session.request(method, url, headers=headers,
                                              allow_redirects=False, timeout=self._timeout)
        target, host, tls_name = pinned(url, pin)
        return await self.session.request(method, target, headers={**headers, "Host": host},
                                          server_hostname=tls_name, allow_redirects=False,
                                          timeout=self._timeout)

    async def _reuse(self, method: str, req: OriginRequest, key: tuple[str, str], target: str,
                     headers: dict[str, str]) -> aiohttp.ClientResponse | None:
        """The remembered target's answer when it still serves; else forget it (the caller
        asks the registry again, which checks the credential and redirects anew)."""
        try:
            resp = await self._send(method, target, await self._check_redirect(req.url, target),
                                    headers)
        except (OriginError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.debug("remembered target for %s failed, asking the registry: %r", req.url, e)
            self._redirects.pop(key, None)
            return None
        if 200 <= resp.status < 300:
            return resp
        resp.release()
        self._redirects.pop(key, None)
        return None

    @contextlib.asynccontextmanager
    async def _request(self, method: str, req: OriginRequest, headers: dict[str, str], *,
                       remembered: bool = False) -> AsyncIterator[aiohttp.ClientResponse]:
        """A request that follows redirects the way registry clients do. Only with
        `remembered` (data reads) may it go straight to where the registry last sent this
        credential."""
        key = (req.url, credential_key(req.authorization))
        target = self._remembered(key) if remembered else None
        if target is not None:
            resp = await self._reuse(method, req, key, target, headers)
            if resp is not None:
                try:
                    yield resp
                finally:
                    resp.release()
                return
        url, auth, pin = req.url, req.authorization, None
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if auth:
                h["Authorization"] = auth
            resp = await self._send(method, url, pin, h)
            location = resp.headers.get("Location")
            if resp.status in _REDIRECT_CODES and location:
                resp.release()
                target = urljoin(url, location)
                pin = await self._check_redirect(req.url, target)
                url = target
                auth = None  # signed URLs carry their own credentials
                if method == "GET":
                    self._remember(key, url)
                continue
            try:
                yield resp
            finally:
                resp.release()
            return
        raise OriginError(f"too many redirects for {req.url}")

    async def _check_redirect(self, registry: str, target: str) -> Address | None:
        """Refuse a redirect into the peer's network; else the address to connect to (None:
        the target is allow-listed, reached by name like a registry)."""
        parts = urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OriginError(f"redirect to {target[:200]!r} refused: not http(s)")
        if parts.username is not None or parts.password is not None:
            raise OriginError("redirect refused: the target carries userinfo")
        port = _port(target)
        if self.allowed(parts.netloc):
            return None
        addresses = await self._addresses(parts.hostname, port)
        own: set[Endpoint] = set()
        if not all(_unmapped(a).is_global for a in addresses):
            own_port = _port(registry)
            own = {(_unmapped(a), own_port)
                   for a in await self._addresses(urlsplit(registry).hostname or "", own_port)}
        reason = redirect_refusal(addresses, port, own)
        if reason is not None:
            raise OriginError(reason)
        return addresses[0]

    async def _addresses(self, host: str, port: int) -> list[Address]:
        """Every address a host name resolves to (an IP literal is its own), in the
        resolver's order."""
        try:
            return [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            pass
        try:
            infos = await self.resolver.resolve(host, port, socket.AF_UNSPEC)
        except OSError as e:
            raise OriginError(f"cannot resolve {host!r}: {e}") from e
        addresses = [ipaddress.ip_address(info["host"]) for info in infos]
        if not addresses:
            raise OriginError(f"{host!r} resolves to no address")
        return addresses

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
                self._request("GET", req, {"Range": f"bytes={start}-{end}"},
                              remembered=True) as resp:
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

