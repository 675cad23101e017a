"""A nydusd emulator: the requests nydusd's registry backend makes, as
../shared/reference/clients.md describes them (nydus storage/src/backend/registry.rs,
connection.rs; v2.2-v2.4), since nydusd itself cannot be installed here.

What it does, like nydusd:
- every GET carries `Range: bytes=a-b` (inclusive) and must get exactly that many bytes back
  (any status 200-399 is success; nydusd never checks for 206, a short or long body breaks it);
- opening a blob reads `blob.meta` with one range read near the end;
- on-demand reads of 128 KiB-1 MiB at unaligned offsets (`X-Dragonfly-Priority: 6`);
- prefetch by 8 concurrent workers, neighbouring reads merged up to 1 MiB while gaps are at
  most size/128 (`X-Dragonfly-Priority: 3`, `X-Dragonfly-Prefetch: true`);
- 5 s connect and 5 s read timeouts, up to 3 retries on demand;
- mirror mode: the blob URL's scheme/host/port become the mirror's, the configured headers
  (`X-Dragonfly-Registry`) are added; a response < 500 is final, >= 500 or a transport error
  falls back to the registry itself;
- proxy mode: an absolute-form `GET http://registry/v2/...` to the proxy (`use_http` rewrites an
  https registry URL to http);
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

MiB = 1 << 20
KiB = 1 << 10
USER_AGENT = "nydusd/1.0.0"


@dataclass
class Read:
    offset: int
    length: int
    seconds: float
    kind: str


@dataclass
class Nydus:
    registry: str  # the blob's registry as nydusd knows it: scheme://host:port
    repo: str
    digest: str
    size: int
    mirror: str | None = None  # mirror mode: the mirror's base URL
    proxy: str | None = None  # proxy mode: the proxy's URL
    use_http: bool = True  # proxy mode: rewrite https to http (else https arrives as CONNECT)
    ssl: object = True  # what verifies the registry's certificate when talking TLS
    mirror_headers: dict[str, str] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0
    reads: list[Read] = field(default_factory=list)
    fallbacks: int = 0  # requests that went to the registry after the mirror failed

    def __post_init__(self) -> None:
        self._token: str | None = None
        self._first = asyncio.Lock()  # the first blob request of a host runs alone
        self._authenticated = asyncio.Event()
        self._redirect: str | None = None
        self._basic: str | None = None

    # -- HTTP ------------------------------------------------------------------------------

    def _url(self) -> str:
        path = f"/v2/{self.repo}/blobs/{self.digest}"
        if self.mirror:
            return self.mirror.rstrip("/") + path
        if self.proxy and self.use_http:
            return self.registry.replace("https://", "http://") + path
        return self.registry + path

    def _auth_header(self) -> dict[str, str]:
        if self._token:
            return {"Authorization": f"Bearer {self._token}"}
        if self._basic:
            return {"Authorization": self._basic}
        return {}

    async def _get_token(self, session: aiohttp.ClientSession, challenge: str) -> None:
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
        kw = {"proxy": self.proxy} if self.proxy else {}
        async with session.post(fields["realm"], data=form, headers=creds, **kw) as r:
            body = await r.json() if r.status == 200 else None
        if body is None:  # GET fallback
            query = {k: v for k, v in form.items() if k in ("service", "scope")}
            async with session.get(fields["realm"], params=query, headers=creds, **kw) as r:
                r.raise_for_status()
                body = await r.json()
        self._token = body.get("token") or body.get("access_token")

    async def _request(self, session: aiohttp.ClientSession, offset: int, length: int,
                       headers: dict[str, str]) -> bytes:
        h = {"Range": f"bytes={offset}-{offset + length - 1}", "User-Agent": USER_AGENT,
             **headers}
        if self.mirror:
            h.update(self.mirror_headers)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                        sock_read=self.timeout)
        kw = {"proxy": self.proxy} if self.proxy else {}
        url = self._redirect or self._url()
        for _ in range(3):  # a 401 gets one token dance, a 3xx is followed
            send = dict(h) if url != self._redirect else {k: v for k, v in h.items()
                                                          if k != "Authorization"}
            if url != self._redirect:
                send.update(self._auth_header())
            async with session.get(url, headers=send, allow_redirects=False, timeout=timeout,
                                   ssl=self.ssl, **kw) as r:
                if r.status == 401 and "WWW-Authenticate" in r.headers and url != self._redirect:
                    await self._get_token(session, r.headers["WWW-Authenticate"])
                    continue
                if 300 <= r.status < 400 and "Location" in r.headers:
                    url = self._redirect = r.headers["Location"]
                    continue
                if r.status >= 500:
                    raise MirrorFailed(f"{r.status} from {url}")
                if r.status >= 300:
                    raise ReadFailed(f"{r.status} from {url}: {(await r.text())[:300]}")
                body = await r.read()
            if len(body) != length:
                raise ReadFailed(f"asked for {length} bytes at {offset}, got {len(body)}")
            return body
        raise ReadFailed(f"no answer for {offset}+{length} after auth and redirects")

    async def read(self, session: aiohttp.ClientSession, offset: int, length: int,
                   kind: str = "on-demand") -> bytes:
        headers = {}
        if self.proxy or self.mirror:
            headers["X-Dragonfly-Priority"] = "3" if kind == "prefetch" else "6"
            headers["X-Dragonfly-Use-P2P"] = "true"
            if kind == "prefetch":
                headers["X-Dragonfly-Prefetch"] = "true"
        started = time.monotonic()
        if not self._authenticated.is_set():
            async with self._first:  # the first request of a host runs alone
                body = await self._read_with_retries(session, offset, length, headers)
                self._authenticated.set()
        else:
            body = await self._read_with_retries(session, offset, length, headers)
        self.reads.append(Read(offset, length, time.monotonic() - started, kind))
        return body

    async def _read_with_retries(self, session: aiohttp.ClientSession, offset: int,
                                 length: int, headers: dict[str, str]) -> bytes:
        error: Exception | None = None
        for _ in range(3):
            try:
                return await self._request(session, offset, length, headers)
            except MirrorFailed as e:
                error = e
                if self.mirror:  # the mirror is unhealthy: nydusd goes to the registry
                    self.fallbacks += 1
                    fallback = Nydus(self.registry, self.repo, self.digest, self.size,
                                     username=self.username, password=self.password,
                                     ssl=self.ssl)
                    return await fallback._request(session, offset, length, {})
            except (aiohttp.ClientError, TimeoutError) as e:
                error = e
        raise ReadFailed(f"read {offset}+{length} failed: {error!r}")

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
        every byte is checked against `blob`."""
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
                got = await self.read(session, off, length, "prefetch")
                assert got == blob[off:off + length], f"prefetch {off}+{length} wrong"

        async def on_demand() -> None:
            for off, length in demand:
                got = await self.read(session, off, length)
                assert got == blob[off:off + length], f"read {off}+{length} wrong"

        await asyncio.gather(on_demand(), *(prefetch_worker() for _ in range(workers)))


class ReadFailed(Exception):
    pass


class MirrorFailed(Exception):
    pass
