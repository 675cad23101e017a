"""The mirror and proxy front (`--listen`): what nydusd, containerd, docker and skopeo talk to.

Blob GETs go peer-to-peer through the engine; everything else goes to the upstream registry
unchanged. Before a blob is served from the store or from peers, the registry is asked (HEAD
with the client's Authorization, cached briefly per credential, registry, repository and
digest) whether this client may read it there: a refusal is passed back to the client exactly as
the registry gave it, and no byte of the blob is served.

Dragonfly's headers, as today's nydusd sends them in proxy mode: `X-Dragonfly-Use-P2P: false`
passes a blob request to the registry unchanged; `X-Dragonfly-Prefetch: false` keeps a range
read from fetching the rest of the blob in the background (true, or no header: it does, once
per task, after the range is answered). Every answer the peer makes about its own failure
carries `X-Dragonfly-Error-Type: proxy`, relayed registry answers never do; an on-demand read
that cannot start promptly is answered 429 so nydusd reads from the registry itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from common import ids
from common.flight import SingleFlight
from common.limits import ON_DEMAND, ON_DEMAND_PATIENCE, parse_priority
from common.log import request_ids
from common.metrics import PeerMetrics, metrics_handler
from common.models import ACCESS_TTL_MS, AccessReply
from common.ranges import ByteRange, InvalidRange, UnsatisfiableRange, parse_range
from common.tasks import Activity
from common.web import (
    Handler,
    bodiless,
    error,
    errors_as_json,
    healthy,
    send_file,
    unavailable,
)
from peer import hub
from peer.engine import Engine, LengthConflict
from peer.origin import OriginClient, OriginError, OriginRequest, Probe, credential_key
from peer.proxy import passthrough, relative_to, tunnel
from peer.sched_transport import SchedulerRefused, SchedulerUnavailable
from peer.upstream import AllowList, Registry, UpstreamRefused, choose_upstream

log = logging.getLogger("naiad.peer.mirror")

ACCESS_TTL = 60.0
# How long a peer waits for another peer's pending registry answer before asking itself.
SHARED_WAIT_MS = 2000
HUB_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
PROXY_ERROR = ("X-Dragonfly-Error-Type", "proxy")  # nydusd: the proxy failed, not the registry
START_POLL = 0.05  # how often a waiting on-demand read looks at the origin queue again
_ACCESS_MAX = 100_000
# The OCI distribution spec's repository name grammar.
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
                      r"(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_MAX_REPO = 255
# A registry API path naming a repository: /v2/<name>/manifests|blobs|tags/...
_NAMED_RE = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags)/")


# A manifest is named by a tag or a digest (sha256/sha512 in lowercase hex, as registries
# check them); anything else some registries answer with a 500.
_MANIFEST_RE = re.compile(r"^/v2/.+/manifests/(.*)$")
_REFERENCE_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|sha256:[a-f0-9]{64}"
                           r"|sha512:[a-f0-9]{128})$")


def _valid_repo(name: str) -> bool:
    return len(name) <= _MAX_REPO and bool(_REPO_RE.fullmatch(name))


class SharedAccess(Protocol):
    """Registry answers shared cluster-wide through the scheduler (scheduler/access.py);
    `SchedulerClient` is one. Raises `SchedulerUnavailable`/`SchedulerRefused` when it cannot
    help: the peer then asks the registry itself."""

    async def lookup_access(self, key: str, wait_ms: int) -> AccessReply: ...
    async def publish_access(self, key: str, status: int, length: int | None,
                             ttl_ms: int) -> None: ...


class AccessCache:
    """Registry answers to "may this credential read this blob here", kept for `ttl` seconds;
    concurrent questions with the same key share one request.

    With `shared` and the cluster `secret`, a registry's answer is also shared with the other
    peers (scheduler/access.py says why that is safe): asked first, the scheduler gives
    another peer's answer for the same credential, registry and scope, kept here only for what
    remains of its life, or the claim to ask the registry and publish what it said. A model
    hub's metadata check (`ask` given) stays local: its headers are part of the answer."""

    def __init__(self, origin: OriginClient, ttl: float = ACCESS_TTL,
                 shared: SharedAccess | None = None, secret: bytes | None = None) -> None:
        self.origin = origin
        self.ttl = min(ttl, ACCESS_TTL_MS / 1000)
        self.shared = shared if secret is not None else None  # no secret: nothing shared
        self._secret = secret or b""
        self._answers: dict[tuple[str, ...], tuple[float, Probe]] = {}
        self._asking: SingleFlight[tuple[str, ...], Probe] = SingleFlight()
        # Where answers came from: the registry asked, the cluster's shared answers.
        self.counts = {"registry": 0, "shared": 0}

    @staticmethod
    def key(req: OriginRequest, scope: str) -> tuple[str, ...]:
        """An answer is bound to its evidence: the credential, the registry that was asked,
        and the scope (repository@digest, or a URL with its signature)."""
        return credential_key(req.authorization), req.registry, scope

    def shared_key(self, key: tuple[str, ...]) -> str:
        """The name of an answer at the scheduler: an HMAC under the cluster secret, so the
        scheduler holds no credential, repository or URL, nor anything to test guesses on."""
        text = "\0".join(("naiad-access/1", *key)).encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()

    async def probe(self, req: OriginRequest, scope: str,
                    ask: Callable[[OriginRequest], Awaitable[Probe]] | None = None) -> Probe:
        """The answer to `ask(req)` (default: the origin's blob probe), cached for this key."""
        key = self.key(req, scope)
        hit = self._answers.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        if ask is None and self.shared is not None:
            return await self._asking.run(key, lambda: self._ask_shared(key, req))
        return await self._asking.run(key, lambda: self._ask(key, req, ask or self.origin.probe))

    def _keep(self, key: tuple[str, ...], answer: Probe, until: float) -> None:
        if len(self._answers) >= _ACCESS_MAX:
            now = time.monotonic()
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
        self._answers[key] = (until, answer)

    async def _ask(self, key: tuple[str, ...], req: OriginRequest,
                   ask: Callable[[OriginRequest], Awaitable[Probe]]) -> Probe:
        answer = await ask(req)
        self.counts["registry"] += 1
        if answer.status < 500:  # a registry that failed is asked again next time
            self._keep(key, answer, time.monotonic() + self.ttl)
        return answer

    async def _ask_shared(self, key: tuple[str, ...], req: OriginRequest) -> Probe:
        assert self.shared is not None
        name = self.shared_key(key)
        asked = time.monotonic()  # a shared answer's life is counted from here: never longer
        try:
            reply = await self.shared.lookup_access(name, SHARED_WAIT_MS)
        except (SchedulerUnavailable, SchedulerRefused) as e:
            log.debug("access answers not shared now (%s): asking the registry", e)
        else:
            if reply.status is not None:
                until = asked + min(reply.ttl_ms / 1000, self.ttl)
                answer = Probe(reply.status, reply.length)
                self.counts["shared"] += 1
                if until > time.monotonic():
                    self._keep(key, answer, until)
                return answer
        try:
            answer = await self._ask(key, req, self.origin.probe)
        except Exception:
            await self._publish(name, 599, None, 0)  # the claim back: others ask at once
            raise
        hit = self._answers.get(key)
        left = hit[0] - time.monotonic() if hit is not None and hit[1] is answer else 0.0
        await self._publish(name, answer.status, answer.length, int(left * 1000))
        return answer

    async def _publish(self, name: str, status: int, length: int | None, ttl_ms: int) -> None:
        """Tell the other peers (best effort: a scheduler away only costs them a HEAD)."""
        assert self.shared is not None
        try:
            await self.shared.publish_access(name, status, length, max(0, ttl_ms))
        except (SchedulerUnavailable, SchedulerRefused) as e:
            log.debug("access answer not shared (%s)", e)


def dragonfly_flag(value: str | None) -> bool | None:
    """`X-Dragonfly-Use-P2P` / `X-Dragonfly-Prefetch`: true, false, or not said (None)."""
    value = (value or "").strip().lower()
    return True if value == "true" else False if value == "false" else None


class Overloaded(Exception):
    """An on-demand read cannot start promptly: parents and origin connections are taken."""


def too_many(message: str) -> web.Response:
    resp = error(429, message)
    resp.headers["Retry-After"] = "1"
    return resp


def proxy_host(request: web.Request) -> str | None:
    """The registry host of an absolute-form request target (`GET http://host/v2/...`)."""
    raw = request.raw_path
    if raw.startswith(("http://", "https://")):
        return urlsplit(raw).netloc or None
    return None


class Mirror:
    def __init__(self, *, engine: Engine, origin: OriginClient, access: AccessCache,
                 session: aiohttp.ClientSession, allow: AllowList, default: Registry,
                 metrics: PeerMetrics, hub: Registry | None = None) -> None:
        self.engine = engine
        self.origin = origin
        self.access = access
        self.session = session
        self.allow = allow
        self.default = default
        self.metrics = metrics
        self.hub = hub  # --hub: where /api/... and /{repo}/resolve/... go
        self.served = 0
        self.draining = False
        self.activity = Activity()  # client requests under way
        self._active = 0

    def app(self) -> web.Application:
        app = request_ids(web.Application(
            middlewares=[self._own_failures, self._drain, errors_as_json, self._connect],
            client_max_size=64 << 20))
        r = app.router
        r.add_get("/healthy", healthy)
        r.add_get("/server/ping", healthy)
        r.add_get("/metrics", metrics_handler(self.metrics.registry))
        r.add_get("/download", self.download)
        r.add_get(r"/v2/{name:.+}/blobs/{digest:[^/]+}", self.blob)  # HEAD too
        r.add_route("*", "/v2/{tail:.*}", self.upstream)
        r.add_route("*", "/v2", self.upstream)
        r.add_route("*", "/{tail:.*}", self.other)
        return app

    @web.middleware
    async def _own_failures(self, request: web.Request,
                            handler: Handler) -> web.StreamResponse:
        """The peer's own failures carry `X-Dragonfly-Error-Type: proxy`, so nydusd tells them
        from the registry's: an answer the peer made (a 4xx/5xx response not yet sent) is
        marked; a registry's answer is streamed through, already sent when it comes back here,
        and never marked. An unexpected exception is the peer's 500, unless bytes went out."""
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                e.headers[PROXY_ERROR[0]] = PROXY_ERROR[1]
                self.metrics.own_failures.labels(str(e.status)).inc()
            raise
        except asyncio.CancelledError:
            raise
        except ConnectionError as e:
            if request.writer.output_size == 0 and request.transport is not None \
                    and not request.transport.is_closing():
                log.warning("cannot answer %s %s: %r", request.method, request.path[:200], e)
                resp = error(502, f"cannot answer: {e}")
            else:
                # The client hung up mid-answer (or the body broke after its headers): a line,
                # not aiohttp's traceback; the connection ends so no short body looks whole.
                log.info("%s %s ended early: %r", request.method, request.path[:200], e)
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=499)  # never sent: nginx's "client closed request"
        except Exception:
            if request.writer.output_size > 0:
                raise  # headers are out: aiohttp ends the connection
            log.exception("internal error answering %s %s", request.method, request.path[:200])
            resp = error(500, "internal error in the peer")
        if resp.status >= 400 and not resp.prepared:
            resp.headers[PROXY_ERROR[0]] = PROXY_ERROR[1]
            self.metrics.own_failures.labels(str(resp.status)).inc()
        return resp

    @web.middleware
    async def _drain(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Requests are counted while under way; once the peer is stopping (`drain`) new ones
        are refused, so a client goes to its registry instead."""
        if self.draining:
            resp = unavailable("the peer is shutting down")
            resp.force_close()
            return resp
        self._active += 1
        self.activity.set_busy(True)
        try:
            return await handler(request)
        finally:
            self._active -= 1
            self.activity.set_busy(bool(self._active))

    async def drain(self, seconds: float) -> None:
        """Refuse new requests and let those under way finish, for up to `seconds`."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.activity.idle.wait(), seconds)

    @web.middleware
    async def _connect(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """CONNECT (an https registry through a proxy) is tunnelled to allow-listed registries
        only: TLS end to end, so nothing is shared or cached."""
        if request.method != "CONNECT":
            return await handler(request)
        target = request.raw_path
        try:
            registry = self.allow.registry_for_host(target)
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise UpstreamRefused(f"CONNECT needs host:port, got {target[:200]!r}")
        except UpstreamRefused as e:
            return error(403, f"CONNECT refused: {e}")
        log.info("tunnelling CONNECT to %s (%s)", target, registry.base)
        return await tunnel(request, host.strip("[]"), int(port))

    async def other(self, request: web.Request) -> web.StreamResponse:
        """Outside /v2: proxy-mode requests to an allow-listed host are passed on (a token
        realm on the registry's host, say); the model hub's file downloads and API calls go to
        `--hub`; anything else is not ours."""
        host = proxy_host(request)
        if host is None:
            if self.hub is not None:
                download = hub.parse_resolve(request.rel_url.raw_path) is not None
                if download and request.method in ("GET", "HEAD"):
                    return await self.hub_file(request)
                if download or hub.is_api_path(request.path):
                    return await self._to_hub(request, self._hub_url(request))
            return error(404, f"no such endpoint {request.path[:200]}")
        try:
            registry = self.allow.registry_for_host(host)
        except UpstreamRefused as e:
            return error(403, str(e))
        return await passthrough(request, self.session, self._upstream_url(registry, request))

    def _registry(self, request: web.Request) -> Registry:
        return choose_upstream(header=request.headers.get("X-Dragonfly-Registry"),
                               ns=request.query.get("ns"), proxy_host=proxy_host(request),
                               default=self.default, allow=self.allow)

    @staticmethod
    def _upstream_url(registry: Registry, request: web.Request) -> str:
        query = urlencode([(k, v) for k, v in request.rel_url.query.items() if k != "ns"])
        return f"{registry.base}{request.rel_url.raw_path}" + (f"?{query}" if query else "")

    async def upstream(self, request: web.Request) -> web.StreamResponse:
        named = _NAMED_RE.match(request.path)
        if named and not _valid_repo(named.group(1)):
            return error(400, f"invalid repository name {named.group(1)[:100]!r}")
        manifest = _MANIFEST_RE.match(request.path)
        if manifest and not _REFERENCE_RE.fullmatch(manifest.group(1)):
            return error(400, f"invalid manifest reference {manifest.group(1)[:100]!r}: "
                              "a tag or a lowercase sha256/sha512 digest")
        try:
            registry = self._registry(request)
        except UpstreamRefused as e:
            return error(403, str(e))
        return await passthrough(request, self.session, self._upstream_url(registry, request))

    async def blob(self, request: web.Request) -> web.StreamResponse:
        name, digest = request.match_info["name"], request.match_info["digest"]
        if not _valid_repo(name):
            return error(400, f"invalid repository name {name[:100]!r}")
        if not ids.is_blob_digest(digest):
            return error(400, f"unsupported or invalid digest {digest[:100]!r}")
        try:
            registry = self._registry(request)
        except UpstreamRefused as e:
            return error(403, str(e))
        if dragonfly_flag(request.headers.get("X-Dragonfly-Use-P2P")) is False:
            # The client wants the registry itself (still only an allow-listed one).
            return await passthrough(request, self.session, self._upstream_url(registry, request))
        req = OriginRequest(url=f"{registry.base}/v2/{name}/blobs/{digest}",
                            registry=registry.base,
                            authorization=request.headers.get("Authorization"))
        return await self._serve(request, req, scope=f"{name}@{digest}", task_id=digest,
                                 digest=digest, expect=digest)

    async def download(self, request: web.Request) -> web.StreamResponse:
        url = request.query.get("url", "")
        digest = request.query.get("digest")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return error(400, "url must be an absolute http(s) URL")
        if parts.username or parts.password or "@" in parts.netloc:
            return error(400, "url must not carry userinfo")
        try:
            registry = self.allow.registry_for_host(parts.netloc)
        except UpstreamRefused as e:
            return error(403, str(e))
        if parts.scheme != registry.scheme:
            # The allow-list entry says how to reach the host: never credentials in clear.
            return error(403, f"{registry.host} is allow-listed as {registry.base}: "
                              f"use {registry.scheme}, not {parts.scheme}")
        if digest is not None and not ids.is_blob_digest(digest):
            return error(400, f"invalid digest {digest[:100]!r}")
        req = OriginRequest(url=url, registry=registry.base,
                            authorization=request.headers.get("Authorization"))
        # Access is asked for this exact URL, signature included (a presigned URL is its own
        # credential); only the task id, which names the bytes, drops the signature.
        return await self._serve(request, req, scope=url,
                                 task_id=ids.task_id_for_url(url), digest=None, expect=digest)

    def _hub_url(self, request: web.Request) -> str:
        assert self.hub is not None
        return f"{self.hub.base}{request.rel_url.raw_path_qs}"

    async def _to_hub(self, request: web.Request, url: str) -> web.StreamResponse:
        """The hub's own answer; a redirect within the hub comes back to this peer."""
        assert self.hub is not None
        return await passthrough(request, self.session, url, relative_to(self.hub.base))

    async def hub_file(self, request: web.Request) -> web.StreamResponse:
        """`HEAD|GET /{repo}/resolve/{revision}/{path}`. An LFS file (the hub's metadata HEAD,
        with this client's Authorization, names its sha256) is served peer-to-peer as task
        `sha256:<X-Linked-Etag>`, with the hub's metadata headers and no redirect, so the
        client stays here; anything else (a small file kept in git, a refusal, a missing file
        or revision) is the hub's own answer, passed through."""
        started = time.monotonic()
        url = self._hub_url(request)
        assert self.hub is not None
        req = OriginRequest(url=url, registry=self.hub.base,
                            authorization=request.headers.get("Authorization"))
        try:
            # The access check, cached like a registry's: this credential, this hub, this URL.
            probe = await self.access.probe(req, f"hub {url}", self._hub_metadata)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return error(502, f"hub unreachable: {e!r}")
        lfs = hub.lfs_file(probe.status, probe.headers)
        if lfs is None:
            return await self._to_hub(request, url)
        return await self._send(request, req, length=lfs.size, task_id=lfs.task_id,
                                digest=lfs.task_id, expect=lfs.task_id,
                                identity=hub.client_headers(probe.headers), started=started)

    async def _hub_metadata(self, req: OriginRequest) -> Probe:
        """The hub's metadata HEAD, as huggingface_hub sends it: the client's Authorization,
        no compression, and the redirect to the CDN not followed (its headers are the
        metadata)."""
        headers = {"Accept-Encoding": "identity"}
        if req.authorization:
            headers["Authorization"] = req.authorization
        async with self.session.head(req.url, headers=headers, allow_redirects=False,
                                     timeout=HUB_TIMEOUT) as resp:
            lfs = hub.lfs_file(resp.status, resp.headers)
            return Probe(resp.status, lfs.size if lfs else None, CIMultiDict(resp.headers))

    @staticmethod
    async def _sendfile(request: web.Request, spans: list[tuple[Path, int, int]]) -> None:
        """Stored chunk files straight to the socket (kernel sendfile), after the headers."""
        for path, offset, count in spans:
            with open(path, "rb") as f:  # noqa: ASYNC230 - a local open is microseconds
                await send_file(request, f, offset, count)

    async def _serve(self, request: web.Request, req: OriginRequest, *, scope: str,
                     task_id: str, digest: str | None,
                     expect: str | None) -> web.StreamResponse:
        """Serve a blob (`digest`: its own digest, the task's identity) or a plain file
        (`expect`: the digest the client says it has) from the engine."""
        started = time.monotonic()
        try:
            probe = await self.access.probe(req, scope)
        except (aiohttp.ClientError, OSError, TimeoutError, OriginError) as e:
            return error(502, f"origin unreachable: {e!r}")
        if not probe.ok:
            # The registry's own answer, body and all: a 401 keeps its WWW-Authenticate.
            return await passthrough(request, self.session, req.url)
        assert probe.length is not None
        identity = {"Docker-Content-Digest": digest, "Etag": f'"{digest}"'} if digest else {}
        return await self._send(request, req, length=probe.length, task_id=task_id,
                                digest=digest, expect=expect, identity=identity,
                                started=started)

    async def _send(self, request: web.Request, req: OriginRequest, *, length: int,
                    task_id: str, digest: str | None, expect: str | None,
                    identity: dict[str, str], started: float) -> web.StreamResponse:
        """Answer a read of a task whose access was checked: `identity` are the headers that
        say what it is (a digest, a hub's metadata)."""
        try:
            rng = parse_range(request.headers.get("Range"), length)
        except InvalidRange as e:
            return error(400, str(e))
        except UnsatisfiableRange as e:
            resp = error(416, str(e))
            resp.headers["Content-Range"] = f"bytes */{length}"
            return resp
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "X-Naiad-Task-Id": task_id, **identity}
        whole = ByteRange(0, length - 1) if length else None
        target = rng or whole
        status = 206 if rng is not None else 200
        if rng is not None:
            headers["Content-Range"] = rng.content_range(length)
        if request.method == "HEAD" or target is None:
            return await bodiless(request, status, headers, target.size if target else 0)
        priority = parse_priority(request.headers.get("X-Dragonfly-Priority"))
        try:
            run = await self.engine.open(task_id, length, digest, req)
        except LengthConflict as e:  # the registry contradicts a copy verified here
            return error(502, str(e))
        plan = await self.engine.plan(run, target, priority)
        headers["X-Naiad-Source"] = plan.source
        if plan.origin_reasons:
            headers["X-Naiad-Origin-Reason"] = ",".join(plan.origin_reasons)
        async with contextlib.AsyncExitStack() as stack:
            spans = await stack.enter_async_context(
                self.engine.local_files(run, target, expect))
            views: AsyncIterator[memoryview] | None = None
            first: memoryview | None = None
            if spans is None:
                views = await stack.enter_async_context(contextlib.aclosing(
                    self.engine.read(run, target, expect, priority)))
                # The first bytes before the headers: until then a failure is still a status.
                try:
                    first = await self._first_bytes(views, req.registry, priority, started)
                except Overloaded as e:
                    log.info("429 for an on-demand read of %s: %s", task_id, e)
                    return too_many(str(e))
                except (ConnectionError, asyncio.CancelledError):
                    raise
                except Exception as e:
                    log.warning("cannot serve %s: %r", task_id, e)
                    return error(502, f"cannot serve {task_id}: {e}")
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = target.size
            await resp.prepare(request)
            try:
                if spans is not None:
                    await self._sendfile(request, spans)
                    self._count(target.size)
                else:
                    assert views is not None
                    if first is not None:
                        await resp.write(first)
                        self._count(len(first))
                    async for view in views:
                        await resp.write(view)
                        self._count(len(view))
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as e:
                # Headers are out: end the connection so the client sees a broken body, never
                # a short or wrong one that looks complete.
                log.error("aborting the %s response for %s: %r", resp.status, task_id, e)
                if request.transport is not None:
                    request.transport.abort()
                return resp
        await resp.write_eof()
        log.info("served %s bytes %d-%d (%s)", task_id, target.start, target.end, plan.source)
        if rng is not None \
                and dragonfly_flag(request.headers.get("X-Dragonfly-Prefetch")) is not False:
            # The range is answered; a lazy reader (nydusd) will likely want the rest.
            self.engine.prefetch(run)
        return resp

    def _count(self, n: int) -> None:
        self.metrics.served_bytes.inc(n)
        self.served += n

    async def _first_bytes(self, views: AsyncIterator[memoryview], registry: str,
                           priority: int, started: float) -> memoryview | None:
        """The read's first verified bytes (None: it has none). An on-demand read gives up
        (`Overloaded`) once it has waited ON_DEMAND_PATIENCE without them while urgent work has
        queued that long for this registry's origin connections: the parents were busy (or
        there are none) and the origin is full, so nydusd is better off at the registry than
        waiting here. The pieces are still fetched (the engine's workers are shared): a later
        read finds them."""
        if priority < ON_DEMAND:
            return await anext(views, None)
        first = asyncio.ensure_future(anext(views, None))
        try:
            while True:
                done, _ = await asyncio.wait([first], timeout=START_POLL)
                if done:
                    return first.result()
                waited = time.monotonic() - started
                queued = self.origin.queued(registry, ON_DEMAND)
                if waited >= ON_DEMAND_PATIENCE and queued >= ON_DEMAND_PATIENCE:
                    raise Overloaded(f"no bytes after {waited:.1f} s; origin connections to "
                                     f"{registry} all taken for {queued:.1f} s")
        finally:
            if not first.done():
                first.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await first  # the read is abandoned, whatever it raised
