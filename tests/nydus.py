"""A nydusd emulator: the requests nydusd's registry backend makes, as
../shared/reference/clients.md describes them (nydus storage/src/backend/registry.rs,
connection.rs, request.rs and retry_op), since nydusd itself cannot be installed here.

What it does, like nydusd:
- every read carries `Range: bytes=a-b` (inclusive) and must get exactly that many bytes back
  (any status 200-399 is success; nydusd never checks for 206, a short or long body breaks it);
  `stream` is `stream_prefetch`: one GET of the whole blob with no Range (or `bytes=N-`);
- opening a blob reads `blob.meta` with one range read near the end;
- on-demand reads of 128 KiB-1 MiB at unaligned offsets, prefetch by 8 concurrent workers,
  neighbouring reads merged up to 1 MiB while gaps are at most size/128;
- 5 s connect and 5 s read timeouts;
- **proxy mode** (today's nydusd, >= 2.3.5): an absolute-form `GET http://registry/v2/...` to
  the proxy (`use_http` rewrites an https registry URL to http; without it aiohttp sends
  CONNECT), with `X-Dragonfly-Priority: 6` (on-demand) or `3` (prefetch),
  `X-Dragonfly-Use-P2P: true` and `X-Dragonfly-Prefetch: true|false` (the backend's setting, on
  every request). The connection layer: a proxy that is unhealthy (its ping not 200-399), a
  transport error or a status >= 500 sends the same request straight to the registry when
  `fallback` is on (else it is an error); anything < 500 is the caller's answer. Then
  `X-Dragonfly-Error-Type: proxy` marks the proxy's own failure: 429 on an on-demand read ->
  bypass the proxy (straight to the registry for `direct_for` seconds, rate-limited to
  `direct_qps` requests a second); 429 on a prefetch -> give that prefetch up; 403 -> no retry;
  another marked status -> an error retried. Retries: 3 on demand (the last one straight to the
  registry), 1 for a prefetch (after a random 0.1-1 s);
- **mirror mode** (nydus <= 2.3.4, `mirrors`, removed upstream in July 2025): the blob URL's
  scheme/host/port become the mirror's, the configured headers (`X-Dragonfly-Registry`) are
  added and no Dragonfly header else; a response < 500 is final, >= 500 or a transport error
  counts a failure and the request goes to the registry itself; after `failure_limit` failures
  the mirror is skipped; up to 3 attempts;
- auth: on 401, Basic with configured credentials, or Bearer from the realm (POST form with
  service, scope, client_id=nydus-registry-client, GET as fallback; `token` or
  `access_token`), then the request is retried; the first blob request of a host runs alone and
  the others wait for its token;
- redirects: any 3xx with Location is followed with the same Range and no Authorization, and the
  target is remembered per blob.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time
from dataclasses import dataclass, field

import aiohttp

from common.limits import TokenBucket

MiB = 1 << 20
KiB = 1 << 10
USER_AGENT = "nydusd/1.0.0"
ON_DEMAND_RETRIES, PREFETCH_RETRIES = 3, 1
STREAM_RETRIES = 10


@dataclass
class Read:
    offset: int
    length: int
    seconds: float
    kind: str


class ReadFailed(Exception):
    pass


class MirrorFailed(Exception):
    """The mirror or proxy itself failed: transport error or a status >= 500."""


class ProxyError(ReadFailed):
    """An answer marked `X-Dragonfly-Error-Type: proxy`."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"proxy answered {status}: {text[:300]}")
        self.status = status


class PrefetchAbandoned(ReadFailed):
    """A prefetch nydusd gave up (the proxy said 429): no error for the container."""


@dataclass
class Nydus:
    registry: str  # the blob's registry as nydusd knows it: scheme://host:port
    repo: str
    digest: str
    size: int
    mirror: str | None = None  # mirror mode: the mirror's base URL
    proxy: str | None = None  # proxy mode: the proxy's URL
    use_http: bool = True  # proxy mode: rewrite https to http (else https arrives as CONNECT)
    fallback: bool = True  # proxy mode: straight to the registry when the proxy fails
    prefetch: bool = True  # proxy mode: the backend's X-Dragonfly-Prefetch
    ping_url: str | None = None  # proxy or mirror health check (see `check`)
    direct_for: float = 5.0  # after a proxy 429 on demand: seconds straight to the registry
    direct_qps: float = 1.0  # requests a second that bypass the proxy
    failure_limit: int = 5  # mirror mode: failures before the mirror is skipped
    ssl: object = True  # what verifies the registry's certificate when talking TLS
    mirror_headers: dict[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0
    reads: list[Read] = field(default_factory=list)
    via_proxy: int = 0  # requests sent to the proxy or mirror
    fallbacks: int = 0  # requests that went to the registry after the proxy/mirror failed
    direct: int = 0  # requests that bypassed the proxy (after a 429, or a last retry)
    limited: int = 0  # proxy 429s
    abandoned: int = 0  # prefetch reads given up

    def __post_init__(self) -> None:
        self._token: str | None = None
        self._first = asyncio.Lock()  # the first blob request of a host runs alone
        self._authenticated = asyncio.Event()
        self._redirect: str | None = None
        self._basic: str | None = None
        self.healthy = True
        self._mirror_failures = 0
        self._direct_until = float("-inf")
        self._qps = TokenBucket(self.direct_qps)

    # -- health ----------------------------------------------------------------------------

    async def check(self, session: aiohttp.ClientSession) -> bool:
        """One tick of the health thread: a plain GET of `ping_url`. Proxy mode: healthy on
        200-399; mirror mode: on anything < 500 (and the failure count starts again)."""
        assert self.ping_url
        try:
            async with session.get(self.ping_url, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                status = r.status
        except (aiohttp.ClientError, TimeoutError):
            status = 599
        self.healthy = 200 <= status < 400 if self.proxy else status < 500
        if self.mirror and self.healthy:
            self._mirror_failures = 0
        return self.healthy

    # -- HTTP ------------------------------------------------------------------------------

    def _path(self) -> str:
        return f"/v2/{self.repo}/blobs/{self.digest}"

    def _url(self, route: str = "") -> str:
        route = route or ("mirror" if self.mirror else "proxy" if self.proxy else "direct")
        if route == "mirror":
            assert self.mirror
            return self.mirror.rstrip("/") + self._path()
        if route == "proxy" and self.use_http:
            return self.registry.replace("https://", "http://") + self._path()
        return self.registry + self._path()

    def _auth_header(self) -> dict[str, str]:
        if self._token:
            return {"Authorization": f"Bearer {self._token}"}
        if self._basic:
            return {"Authorization": self._basic}
        return {}

    async def _get_token(self, session: aiohttp.ClientSession, challenge: str,
                         route: str) -> None:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            creds = f"{self.username}:{self.password}".encode()
            self._basic = "Basic " + base64.b64encode(creds).decode()
            return
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        form = {"service": fields.get("service", ""), "scope": fields.get("scope", ""),
                "client_id": "nydus-registry-client", "grant_type": "password",
                "username": self.username or "", "password": self.password or ""}
        creds = {"Authorization": "Basic " + base64.b64encode(
            f"{self.username}:{self.password or ''}".encode()).decode()} if self.username else {}
        kw = {"proxy": self.proxy} if route == "proxy" else {}
        async with session.post(fields["realm"], data=form, headers=creds, **kw) as r:
            body = await r.json() if r.status == 200 else None
        if body is None:  # GET fallback
            query = {k: v for k, v in form.items() if k in ("service", "scope")}
            async with session.get(fields["realm"], params=query, headers=creds, **kw) as r:
                r.raise_for_status()
                body = await r.json()
        self._token = body.get("token") or body.get("access_token")

    def _headers(self, kind: str, route: str) -> dict[str, str]:
        h = {"User-Agent": USER_AGENT}
        if route == "mirror":
            h.update(self.mirror_headers)
        elif route == "proxy":
            h.update({"X-Dragonfly-Priority": "3" if kind in ("prefetch", "stream") else "6",
                      "X-Dragonfly-Use-P2P": "true",
                      "X-Dragonfly-Prefetch": "true" if self.prefetch else "false"})
        return h

    async def _send(self, session: aiohttp.ClientSession, offset: int, length: int,
                    rng: str | None, kind: str, route: str) -> bytes:
        """One request on one route, with the registry backend's auth dance and redirects:
        exactly `length` bytes, or an exception saying who failed."""
        h = self._headers(kind, route)
        if rng is not None:
            h["Range"] = rng
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                        sock_read=self.timeout)
        kw = {"proxy": self.proxy} if route == "proxy" else {}
        relay = route in ("proxy", "mirror")
        url = self._redirect or self._url(route)
        for _ in range(3):  # a 401 gets one token dance, a 3xx is followed
            redirected = url == self._redirect
            send = {k: v for k, v in h.items() if k != "Authorization"} if redirected \
                else {**h, **self._auth_header()}
            if relay:
                self.via_proxy += 1
            try:
                async with session.get(url, headers=send, allow_redirects=False,
                                       timeout=timeout, ssl=self.ssl, **kw) as r:
                    if relay and r.status >= 500:
                        raise MirrorFailed(f"{r.status} from {url}: {(await r.text())[:300]}")
                    if route == "proxy" and r.headers.get("X-Dragonfly-Error-Type") == "proxy":
                        raise ProxyError(r.status, await r.text())
                    if r.status == 401 and "WWW-Authenticate" in r.headers and not redirected:
                        await self._get_token(session, r.headers["WWW-Authenticate"], route)
                        continue
                    if 300 <= r.status < 400 and "Location" in r.headers:
                        url = self._redirect = r.headers["Location"]
                        continue
                    if r.status >= 300:
                        raise ReadFailed(f"{r.status} from {url}: {(await r.text())[:300]}")
                    body = await r.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                if relay:
                    raise MirrorFailed(f"{url}: {e!r}") from e
                raise
            if len(body) != length:
                raise ReadFailed(f"asked for {length} bytes at {offset}, got {len(body)}")
            return body
        raise ReadFailed(f"no answer for {offset}+{length} after auth and redirects")

    async def _call(self, session: aiohttp.ClientSession, offset: int, length: int,
                    rng: str | None, kind: str, bypass: bool) -> bytes:
        """The connection layer: the proxy (or mirror) unless bypassed or unhealthy, and
        straight to the registry when it fails and falling back is allowed."""
        if self.proxy:
            if bypass:
                self.direct += 1
                await self._qps.take(1)
                return await self._send(session, offset, length, rng, kind, "direct")
            if not self.healthy:
                if not self.fallback:
                    raise ReadFailed("the proxy is unhealthy and fallback is off")
                self.fallbacks += 1
                return await self._send(session, offset, length, rng, kind, "direct")
            try:
                return await self._send(session, offset, length, rng, kind, "proxy")
            except MirrorFailed:
                if not self.fallback:
                    raise
                self.fallbacks += 1
                return await self._send(session, offset, length, rng, kind, "direct")
        if self.mirror and self.healthy and self._mirror_failures < self.failure_limit:
            try:
                return await self._send(session, offset, length, rng, kind, "mirror")
            except MirrorFailed:
                self._mirror_failures += 1
                self.fallbacks += 1
        return await self._send(session, offset, length, rng, kind, "direct")

    async def _retrying(self, session: aiohttp.ClientSession, offset: int, length: int,
                        rng: str | None, kind: str) -> bytes:
        """retry_op: how many attempts, and what a proxy's marked failure changes."""
        prefetch = kind in ("prefetch", "stream")
        retries = STREAM_RETRIES if kind == "stream" else \
            PREFETCH_RETRIES if prefetch else ON_DEMAND_RETRIES
        if not self.proxy:  # mirror mode, or no proxy at all: three attempts
            retries = 2
        bypass = not prefetch and time.monotonic() < self._direct_until
        error: Exception | None = None
        while True:
            try:
                return await self._call(session, offset, length, rng, kind, bypass)
            except ProxyError as e:
                error = e
                if e.status == 403:
                    raise  # the proxy refuses: retrying will not help
                if e.status == 429:
                    self.limited += 1
                    if prefetch:
                        self.abandoned += 1
                        raise PrefetchAbandoned(str(e)) from e
                    bypass = True
                    self._direct_until = time.monotonic() + self.direct_for
            except (ReadFailed, MirrorFailed, aiohttp.ClientError, TimeoutError) as e:
                error = e
            if retries == 0:
                break
            retries -= 1
            if self.proxy and retries == 0 and not prefetch:
                bypass = True  # the last attempt on demand goes straight to the registry
            elif self.proxy and prefetch:
                await asyncio.sleep(random.uniform(0.1, 1.0))
        raise ReadFailed(f"{kind} read {offset}+{length} failed: {error!r}")

    async def read(self, session: aiohttp.ClientSession, offset: int, length: int,
                   kind: str = "on-demand") -> bytes:
        """`length` bytes at `offset` (`kind`: on-demand, prefetch or meta)."""
        rng = f"bytes={offset}-{offset + length - 1}"
        started = time.monotonic()
        if not self._authenticated.is_set():
            async with self._first:  # the first request of a host runs alone
                body = await self._retrying(session, offset, length, rng, kind)
                self._authenticated.set()
        else:
            body = await self._retrying(session, offset, length, rng, kind)
        self.reads.append(Read(offset, length, time.monotonic() - started, kind))
        return body

    async def stream(self, session: aiohttp.ClientSession, start: int = 0) -> bytes:
        """stream_prefetch: the blob from `start` to its end in one GET, with no Range at all
        from the start, else `bytes=N-` (10 retries)."""
        rng = f"bytes={start}-" if start else None
        started = time.monotonic()
        body = await self._retrying(session, start, self.size - start, rng, "stream")
        self.reads.append(Read(start, self.size - start, time.monotonic() - started, "stream"))
        return body

    # -- workload --------------------------------------------------------------------------

    def plan(self, seed: int, on_demand: int = 40,
             prefetch_fraction: float = 0.5) -> tuple[list[tuple[int, int]],
                                                      list[tuple[int, int]]]:
        """On-demand reads (random, unaligned, 128 KiB-1 MiB) and merged prefetch ranges."""
        rng = random.Random(seed)
        demand = []
        for _ in range(on_demand):
            length = rng.randint(128 * KiB, MiB)
            demand.append((rng.randrange(0, self.size - length), length))
        # Prefetch: compressed chunks of ~0.5-1 MiB, some skipped, merged up to 1 MiB while the
        # gap is at most size/128.
        chunks, pos = [], 0
        limit = int(self.size * prefetch_fraction)
        while pos < limit:
            length = rng.randint(MiB // 2, MiB)
            if rng.random() < 0.8:
                chunks.append((pos, min(length, self.size - pos)))
            pos += length + rng.randint(0, 4 * KiB)
        merged: list[tuple[int, int]] = []
        for off, length in chunks:
            if merged:
                m_off, m_len = merged[-1]
                gap = off - (m_off + m_len)
                if gap <= length // 128 and off + length - m_off <= MiB:
                    merged[-1] = (m_off, off + length - m_off)
                    continue
            merged.append((off, length))
        return demand, merged

    async def run(self, session: aiohttp.ClientSession, blob: bytes, seed: int = 0,
                  workers: int = 8) -> None:
        """Open the blob (meta tail read), then on-demand reads alongside 8 prefetch workers;
        every byte is checked against `blob`. A prefetch read nydusd gives up is skipped."""
        if self.ping_url:
            await self.check(session)
        meta_len = min(64 * KiB + 123, self.size)
        offset = self.size - meta_len
        assert await self.read(session, offset, meta_len, "meta") == blob[offset:]
        demand, prefetch = self.plan(seed)
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for item in prefetch:
            queue.put_nowait(item)

        async def prefetch_worker() -> None:
            while not queue.empty():
                off, length = queue.get_nowait()
                try:
                    got = await self.read(session, off, length, "prefetch")
                except PrefetchAbandoned:
                    continue
                assert got == blob[off:off + length], f"prefetch {off}+{length} wrong"

        async def on_demand() -> None:
            for off, length in demand:
                got = await self.read(session, off, length)
                assert got == blob[off:off + length], f"read {off}+{length} wrong"

        await asyncio.gather(on_demand(), *(prefetch_worker() for _ in range(workers)))
