"""Access checks bound to their evidence (issue 11, findings 2 and 4, and the small ones about
redirects and schemes), each run as an attack against live servers on loopback:

- a remembered redirect never stands in for a client's access check: after one authorised pull
  from a token-protected registry whose blobs live in signed storage (answering HEAD to anyone
  holding the URL), clients with no token or a wrong one get the registry's 401 and no byte;
- `/download` access is asked for the full URL, signature included: a presigned object fetched
  by its owner is refused to a client with no or a forged signature;
- `/download` never reaches an https-listed host over http;
- a redirect to another port of the registry's own address is refused without a connection;
- a redirect target is connected at exactly the address that was checked (DNS rebinding);
- an access answer is bound to the registry that was asked (`?ns=`, `X-Dragonfly-Registry`).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from common.ranges import parse_range
from peer.mirror import AccessCache
from peer.origin import OriginClient, OriginError, OriginRequest, pinned, redirect_refusal
from tests.cluster import Cluster, fetch, free_port, metric, serve
from tests.registry_auth import RedirectingTokenRegistry, SignedStorage, TokenServer

MiB = 1 << 20


class Listener:
    """A TCP port that counts the connections it accepts and closes them: proof that nothing
    was sent there."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    async def _accept(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class BlobServer:
    """A plain registry serving `blobs` (HEAD and ranged GET) at `/v2/<any>/blobs/<digest>`;
    `redirect` makes blob reads answer 307 there instead. Counts blob requests."""

    def __init__(self, blobs: dict[str, bytes], host: str = "127.0.0.1",
                 port: int | None = None) -> None:
        self.blobs = blobs
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.redirect: str | None = None
        self.asked = 0
        self.hosts: list[str] = []  # Host headers of /store requests
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/store/{digest}", self._store)
        self._runner = await serve(app, self.port, self.host)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _base(self, _: web.Request) -> web.Response:
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.Response:
        self.asked += 1
        if self.redirect is not None:
            raise web.HTTPTemporaryRedirect(self.redirect)
        return self._serve(request, request.match_info["digest"])

    async def _store(self, request: web.Request) -> web.Response:
        self.hosts.append(request.headers.get("Host", ""))
        return self._serve(request, request.match_info["digest"])

    def _serve(self, request: web.Request, digest: str) -> web.Response:
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        rng = parse_range(request.headers.get("Range"), len(data))
        if rng is None:
            return web.Response(body=data)
        return web.Response(body=data[rng.start:rng.end + 1], status=206,
                            headers={"Content-Range": rng.content_range(len(data))})


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _bearer(tokens: TokenServer, user: str | None, repo: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + tokens.issue(user, [f"repository:{repo}:pull"])}


@dataclass
class SignedRegistry:
    tokens: TokenServer
    storage: SignedStorage
    front: RedirectingTokenRegistry
    blob: bytes
    digest: str


@pytest.fixture
async def signed_registry(tmp_path: Path) -> AsyncIterator[SignedRegistry]:
    """A token-protected registry front whose blob reads redirect to signed storage."""
    blob = os.urandom(4 * MiB + 7)
    digest = _digest(blob)
    tokens = TokenServer(tmp_path, users={"alice": "a-pass", "bob": "b-pass"},
                         grants={"alice": {"private/*": ["pull"]}, "bob": {"public/*": ["pull"]}})
    storage = SignedStorage({digest: blob})
    front = RedirectingTokenRegistry(tokens, storage, {"private/app": {digest}})
    for server in (tokens, storage, front):
        await server.start()
    try:
        yield SignedRegistry(tokens, storage, front, blob, digest)
    finally:
        for server in (front, storage, tokens):
            await server.stop()


# --- finding 2: a remembered redirect never stands in for an access check ----------------------

async def test_remembered_redirect_does_not_skip_the_access_check(
        cluster: Cluster, signed_registry: SignedRegistry) -> None:
    r = signed_registry
    sched = await cluster.scheduler()
    # The storage is another port of the registry's address: it needs its own allow-list entry.
    a, b = await asyncio.gather(
        *(cluster.peer(name, sched.url, r.front.url, "--allow-registry", r.storage.url)
          for name in ("a", "b")))
    path = f"/v2/private/app/blobs/{r.digest}"
    alice = _bearer(r.tokens, "alice", "private/app")
    status, _, body = await fetch(a.url + path, alice)
    assert (status, body) == (200, r.blob)
    sent = r.storage.sent
    served = {p.name: await metric(p.url, "naiad_peer_served_bytes_total") for p in (a, b)}

    strangers = [
        {},  # no token
        _bearer(r.tokens, "bob", "private/app"),  # a valid token that grants nothing here
        {"Authorization": "Bearer " + alice["Authorization"][7:-8] + "AAAAAAAA"},  # forged
        {"Authorization": "Basic YWxpY2U6d3Jvbmc="},  # alice:wrong
    ]
    for peer in (a, b):
        for headers in strangers:
            for extra in ({}, {"Range": "bytes=0-1023"}):
                status, h, body = await fetch(peer.url + path, {**headers, **extra})
                assert status == 401, (peer.name, headers, extra, status)
                assert h["WWW-Authenticate"] == r.tokens.challenge("private/app")
                assert r.blob[:64] not in body and r.blob[-64:] not in body
    for peer in (a, b):
        assert await metric(peer.url, "naiad_peer_served_bytes_total") == served[peer.name]
    assert r.storage.sent == sent, "storage sent blob bytes for a refused client"

    # Alice again, through the other peer: served from peers, the storage sends no blob byte.
    status, _, body = await fetch(b.url + path, alice)
    assert (status, body) == (200, r.blob)
    assert r.storage.sent == sent


async def test_redirects_are_remembered_per_credential_and_never_for_probes(
        signed_registry: SignedRegistry) -> None:
    """The seam under the attack above, against the same live servers: data reads for one
    credential reuse its redirect; another credential, and every probe, asks the registry."""
    r = signed_registry
    url = f"{r.front.url}/v2/private/app/blobs/{r.digest}"
    alice = OriginRequest(url, r.front.url, _bearer(r.tokens, "alice", "private/app")
                          ["Authorization"])
    stranger = OriginRequest(url, r.front.url, None)
    async with aiohttp.ClientSession() as session:
        origin = OriginClient(session, allowed=lambda host: host == r.storage.host)
        for _ in range(2):
            async with origin.open_range(alice, 0, 99) as stream:
                got = b""
                while part := await stream.read():
                    got += part
                assert got == r.blob[:100]
        assert r.front.redirects == 1, "alice's second read did not reuse her redirect"
        with pytest.raises(OriginError) as refused:
            async with origin.open_range(stranger, 0, 99):
                pass
        assert refused.value.status == 401
        assert (await origin.probe(stranger)).status == 401
        refused_before = r.front.refused
        probe = await origin.probe(alice)
        assert probe.ok and probe.length == len(r.blob)
        assert r.front.redirects == 2, "a probe used a remembered redirect"
        assert r.front.refused == refused_before
    assert r.storage.sent == 200


# --- finding 4: /download access is keyed by the URL with its signature ----------------------

async def test_presigned_download_is_refused_without_its_signature(cluster: Cluster) -> None:
    data = os.urandom(3 * MiB + 11)
    storage = SignedStorage({"reports/q3.bin": data})
    await storage.start()
    try:
        sched = await cluster.scheduler()
        a, b = await asyncio.gather(cluster.peer("a", sched.url, storage.url),
                                    cluster.peer("b", sched.url, storage.url))
        signed = storage.sign("reports/q3.bin")

        def download(peer_url: str, url: str) -> str:
            return f"{peer_url}/download?url={quote(url, safe='')}"

        status, h, body = await fetch(download(a.url, signed))
        assert (status, body) == (200, data)
        task_id = h["X-Naiad-Task-Id"]
        sent, refused = storage.sent, storage.refused
        served = {p.name: await metric(p.url, "naiad_peer_served_bytes_total") for p in (a, b)}

        base = signed.partition("?")[0]
        expires = signed.split("se=")[1].split("&")[0]
        attacks = [base, f"{base}?se={expires}", f"{base}?se={expires}&sig={'0' * 64}",
                   f"{base}?se={int(expires) + 60}&sig={signed.rpartition('sig=')[2]}"]
        for peer in (a, b):
            for url in attacks:
                status, _, body = await fetch(download(peer.url, url))
                assert status == 403 and b"AuthenticationFailed" in body, (peer.name, url)
                assert data[:64] not in body
        for peer in (a, b):
            assert await metric(peer.url, "naiad_peer_served_bytes_total") == served[peer.name]
        assert storage.sent == sent
        assert storage.refused > refused, "the storage was never asked"

        # Another client with a valid signature of its own: the same task, from the cache and
        # from peers, with no object byte from the storage.
        other = storage.sign("reports/q3.bin", ttl=600)
        assert other != signed
        for peer, source in ((a, "local"), (b, "peer")):
            status, h, body = await fetch(download(peer.url, other))
            assert (status, body) == (200, data)
            assert h["X-Naiad-Task-Id"] == task_id and h["X-Naiad-Source"] == source
        assert storage.sent == sent
    finally:
        await storage.stop()


# --- /download honours the allow-list's scheme -----------------------------------------------

async def test_download_keeps_the_allow_listed_scheme(cluster: Cluster) -> None:
    tls_host, plain_host = Listener(), Listener()
    for listener in (tls_host, plain_host):
        await listener.start()
    try:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, f"http://127.0.0.1:{plain_host.port}",
                                  "--allow-registry", f"https://127.0.0.1:{tls_host.port}")
        token = {"Authorization": "Bearer not-for-clear-text"}
        for listener, wrong, right in ((tls_host, "http", "https"),
                                       (plain_host, "https", "http")):
            url = f"{wrong}://127.0.0.1:{listener.port}/file.bin"
            status, _, body = await fetch(
                f"{peer.url}/download?url={quote(url, safe='')}", token)
            assert status == 403, (url, status, body)
            assert f"allow-listed as {right}://127.0.0.1:{listener.port}".encode() in body
        assert tls_host.connections == plain_host.connections == 0
        # The allowed scheme does reach the host (its TLS handshake fails: not a server).
        url = f"https://127.0.0.1:{tls_host.port}/file.bin"
        status, _, _ = await fetch(f"{peer.url}/download?url={quote(url, safe='')}")
        assert status == 502 and tls_host.connections >= 1
    finally:
        for listener in (tls_host, plain_host):
            await listener.stop()


# --- redirects: ports compared, the checked address pinned ------------------------------------

async def test_redirect_to_another_port_of_the_registry_is_refused(cluster: Cluster) -> None:
    blob = os.urandom(1000)
    digest = _digest(blob)
    registry, other = BlobServer({digest: blob}), Listener()
    await registry.start()
    await other.start()
    try:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, registry.url)
        url = f"{peer.url}/v2/lib/app/blobs/{digest}"
        for target in (f"http://127.0.0.1:{other.port}/store/{digest}",
                       f"http://localhost:{other.port}/store/{digest}",
                       f"http://[::ffff:127.0.0.1]:{other.port}/store/{digest}"):
            registry.redirect = target
            status, _, body = await fetch(url)
            assert status == 502 and f"port {other.port} refused".encode() in body, \
                (target, status, body)
            assert blob not in body
        assert other.connections == 0, "the peer connected to the other port"
        # The registry's own address and port is followed (the store is the registry itself).
        registry.redirect = f"http://127.0.0.1:{registry.port}/store/{digest}"
        status, _, body = await fetch(url)
        assert (status, body) == (200, blob)
    finally:
        await registry.stop()
        await other.stop()


class FlippingResolver(AbstractResolver):
    """A name that resolves to `first` once and to `then` afterwards: DNS rebinding."""

    def __init__(self, name: str, first: str, then: str) -> None:
        self.name, self.first, self.then = name, first, then
        self.calls = 0

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host != self.name:
            raise OSError(f"unknown host {host}")
        self.calls += 1
        address = self.first if self.calls == 1 else self.then
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def test_redirect_connects_to_the_address_it_checked() -> None:
    """The registry redirects to a name that first resolves to the registry's own address (so
    the check passes) and then to another loopback address where a victim listens. The
    connection goes to the checked address; the later answer is checked and refused."""
    blob = os.urandom(5000)
    digest = _digest(blob)
    registry = BlobServer({digest: blob})
    victim = Listener("127.0.0.2", registry.port)
    await registry.start()
    await victim.start()
    registry.redirect = f"http://rebind.test:{registry.port}/store/{digest}"
    resolver = FlippingResolver("rebind.test", "127.0.0.1", "127.0.0.2")
    try:
        # The connector resolves with the same flipping resolver: a connect by name would
        # get the second answer.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) \
                as session:
            origin = OriginClient(session, resolver=resolver,
                                  allowed=lambda host: host == f"127.0.0.1:{registry.port}")
            req = OriginRequest(f"{registry.url}/v2/lib/app/blobs/{digest}", registry.url)
            probe = await origin.probe(req)
            assert probe.ok and probe.length == len(blob)
            assert resolver.calls == 1, "the name was resolved again to connect"
            assert registry.hosts == [f"rebind.test:{registry.port}"]
            with pytest.raises(OriginError, match=r"127\.0\.0\.2 port"):
                async with origin.open_range(req, 0, 99):
                    pass
        assert victim.connections == 0
    finally:
        await registry.stop()
        await victim.stop()


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(("addresses", "port", "refused"), [
    (["8.8.8.8"], 443, False),  # global: anywhere
    (["127.0.0.1"], 5000, False),  # the registry's own address and port
    (["127.0.0.1"], 5001, True),  # another port there is another server
    (["127.0.0.2"], 5000, True),
    (["::ffff:127.0.0.1"], 5001, True),  # mapped IPv4 is judged as IPv4
    (["::ffff:127.0.0.1"], 5000, False),
    (["8.8.8.8", "10.0.0.1"], 443, True),  # one internal answer is enough to refuse
    (["169.254.169.254"], 80, True),
    (["::1"], 5000, True),
])
def test_redirect_refusal_compares_ports(addresses: list[str], port: int,
                                         refused: bool) -> None:
    own = {(_ip("127.0.0.1"), 5000)}
    assert (redirect_refusal(map(_ip, addresses), port, own) is not None) == refused


@pytest.mark.parametrize(("url", "address", "connect", "host", "tls_name"), [
    ("https://cdn.example.com/o?sig=a%2Bb", "93.184.216.34",
     "https://93.184.216.34/o?sig=a%2Bb", "cdn.example.com", "cdn.example.com"),
    ("http://store.internal:9000/o", "10.0.0.5", "http://10.0.0.5:9000/o",
     "store.internal:9000", None),
    ("https://cdn.example.com:8443/o", "2001:db8::1", "https://[2001:db8::1]:8443/o",
     "cdn.example.com:8443", "cdn.example.com"),
])
def test_pinned_url_keeps_the_name_for_host_and_tls(url: str, address: str, connect: str,
                                                   host: str, tls_name: str | None) -> None:
    target, host_header, name = pinned(url, _ip(address))
    assert (str(target), host_header, name) == (connect, host, tls_name)


# --- an access answer is bound to the registry that was asked --------------------------------

async def test_access_answer_is_bound_to_the_registry_asked(cluster: Cluster) -> None:
    blob = os.urandom(2 * MiB + 3)
    digest = _digest(blob)
    a, b = BlobServer({digest: blob}), BlobServer({})
    for server in (a, b):
        await server.start()
    try:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, a.url, "--allow-registry", b.url)
        path = f"{peer.url}/v2/lib/app/blobs/{digest}"
        status, _, body = await fetch(path)
        assert (status, body) == (200, blob)
        served = await metric(peer.url, "naiad_peer_served_bytes_total")
        b_host = f"127.0.0.1:{b.port}"
        for url, headers in ((f"{path}?ns={b_host}", {}),
                             (path, {"X-Dragonfly-Registry": b.url}),
                             (f"{path}?ns=127.0.0.1:{a.port}", {"X-Dragonfly-Registry": b.url})):
            asked = b.asked
            status, _, body = await fetch(url, headers)
            assert status == 404 and b"BLOB_UNKNOWN" in body, (url, headers)
            assert blob[:64] not in body
            assert b.asked > asked, "registry B was not asked"
        assert await metric(peer.url, "naiad_peer_served_bytes_total") == served
        status, _, body = await fetch(f"{path}?ns=127.0.0.1:{a.port}")
        assert (status, body) == (200, blob)
    finally:
        for server in (a, b):
            await server.stop()


def test_access_key_names_credential_registry_repository_and_digest() -> None:
    base = OriginRequest("u", "https://ghcr.io", "Bearer alice")
    scope = "lib/app@sha256:" + "ab" * 32
    keys = {
        AccessCache.key(base, scope),
        AccessCache.key(OriginRequest("u", "https://ghcr.io", "Bearer bob"), scope),
        AccessCache.key(OriginRequest("u", "https://ghcr.io", None), scope),
        AccessCache.key(OriginRequest("u", "https://quay.io", "Bearer alice"), scope),
        AccessCache.key(base, "lib/other@sha256:" + "ab" * 32),
        AccessCache.key(base, "lib/app@sha256:" + "cd" * 32),
        AccessCache.key(base, "https://s/o?sig=1"),
        AccessCache.key(base, "https://s/o?sig=2"),
    }
    assert len(keys) == 8
    assert all("alice" not in part for key in keys for part in key), "a raw credential in a key"


def test_shared_access_key_is_an_hmac_of_the_whole_key_under_the_cluster_secret() -> None:
    """What the scheduler sees of an access answer (scheduler/access.py): 64 hex digits that
    change with the credential, registry, repository, digest, a URL's signature and the
    cluster's secret, and carry none of them."""
    base = OriginRequest("u", "https://ghcr.io", "Bearer alice")
    scope = "lib/app@sha256:" + "ab" * 32
    one = AccessCache(origin=None, shared=object(), secret=b"1" * 32)  # type: ignore[arg-type]
    other = AccessCache(origin=None, shared=object(), secret=b"2" * 32)  # type: ignore[arg-type]
    requests = [(base, scope),
                (OriginRequest("u", "https://ghcr.io", "Bearer bob"), scope),
                (OriginRequest("u", "https://ghcr.io", None), scope),
                (OriginRequest("u", "https://quay.io", "Bearer alice"), scope),
                (base, "lib/other@sha256:" + "ab" * 32),
                (base, "lib/app@sha256:" + "cd" * 32),
                (base, "https://s/o?sig=1"), (base, "https://s/o?sig=2")]
    names = {one.shared_key(AccessCache.key(r, s)) for r, s in requests}
    assert len(names) == len(requests)
    assert all(len(n) == 64 and set(n) <= set("0123456789abcdef") for n in names)
    assert not names & {other.shared_key(AccessCache.key(r, s)) for r, s in requests}
    # Without a cluster secret nothing is shared at all (anyone could publish a yes).
    assert AccessCache(origin=None, shared=object()).shared is None  # type: ignore[arg-type]
