"""Hostile input against live servers: every malformed or malicious request answers a clear 4xx
(or is dropped), nothing crashes, no state is corrupted, nothing is fetched from where it must
not be. Example counts are what docs/reliability.md quotes (FUZZ_EXAMPLES)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common import auth
from tests.cluster import (
    Cluster,
    CountingProxy,
    Node,
    Registry,
    free_port,
    member_secret,
    push_blob,
)

MiB = 1 << 20
FUZZ_EXAMPLES = int(os.environ.get("NAIAD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


async def raw_request(port: int, head: bytes, seconds: float = 10.0) -> tuple[int, bytes]:
    """Send exact bytes (no client-side normalisation of the target); the status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), seconds)
    finally:
        writer.close()
    return _parse(data)


def raw_request_sync(port: int, head: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """The same, blocking: for hypothesis-driven tests against servers in other processes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        chunks = []
        while data := sock.recv(1 << 16):
            chunks.append(data)
    return _parse(b"".join(chunks))


def _parse(data: bytes) -> tuple[int, bytes]:
    parts = data.split(b"\r\n", 1)[0].split(b" ")
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return status, data.partition(b"\r\n\r\n")[2]


def _port(node: Node) -> int:
    return int(node.url.rsplit(":", 1)[1])


@pytest.fixture
async def target(cluster: Cluster, registry: Registry,
                 repo: str) -> AsyncIterator[tuple[Node, Node, str, bytes]]:
    """A peer holding a blob, its registry reached directly (the blocking fuzz loops must not
    starve an in-process front)."""
    blob = os.urandom(2 * MiB + 77)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, registry.url)
    peer.extra["repo_path"] = f"/v2/{repo}/blobs/{digest}"
    async with aiohttp.ClientSession() as s, s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
        assert await r.read() == blob
    yield peer, sched, digest, blob
    # Whatever was thrown at it, the peer still serves the blob exactly.
    async with aiohttp.ClientSession() as s, s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
        assert r.status == 200 and await r.read() == blob
    assert peer.proc.popen.poll() is None


_SEGMENT = st.one_of(
    st.sampled_from(["..", ".", "%2e%2e", "%2E%2E%2F", "blobs", "manifests", "uploads", "", "//",
                     "sha256:" + "a" * 64, "sha256:" + "A" * 64, "sha256:" + "0" * 63,
                     "sha512:" + "0" * 128, "sha256:../../etc/passwd", "%00", "\u00e9",
                     "a" * 300, "library", "tags", "list", "..%2f..%2f", ";x=y"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-:%", min_size=0, max_size=40))


async def test_v2_paths_and_methods(target: tuple) -> None:
    peer, _, _, blob = target
    port = _port(peer)

    @given(segments=st.lists(_SEGMENT, min_size=0, max_size=8),
           method=st.sampled_from(["GET", "HEAD", "DELETE", "PUT", "POST", "PATCH", "OPTIONS"]))
    # Found by the fuzz: distribution answers an upper-case "digest" as a tag with a 500.
    @example(segments=["blobs", "manifests", "%2E%2E%2F", "..", "sha256:" + "A" * 64],
             method="GET")
    @FUZZ
    def fuzz(segments: list[str], method: str) -> None:
        path = "/v2/" + "/".join(segments)
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" \
               f"Content-Length: 0\r\n\r\n".encode("utf-8", "surrogateescape")
        status, body = raw_request_sync(port, head)
        assert 200 <= status < 500, (path, status, body[:200])
        assert blob[:64] not in body, f"{path} leaked blob bytes"

    fuzz()


async def test_range_headers(target: tuple) -> None:
    peer, _, _, blob = target
    port, path = _port(peer), peer.extra["repo_path"]

    @given(header=st.one_of(
        st.text(max_size=60),
        st.from_regex(r"bytes=[0-9]{0,25}-[0-9]{0,25}(,[0-9]{0,5}-[0-9]{0,5}){0,3}",
                      fullmatch=True),
        st.from_regex(r"bytes=-[0-9]{1,22}", fullmatch=True)))
    @FUZZ
    def fuzz(header: str) -> None:
        try:
            encoded = header.encode("latin-1")
        except UnicodeEncodeError:
            return  # not expressible as an HTTP header value
        if b"\r" in encoded or b"\n" in encoded:
            return
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() \
            + b"Range: " + encoded + b"\r\n\r\n"
        status, body = raw_request_sync(port, head)
        assert status in (200, 206, 400, 416), (header, status, body[:200])
        if status == 206:
            assert len(body) > 0 and body in blob
        if status == 200:
            assert body == blob

    fuzz()


async def test_proxy_targets_off_the_allow_list_reach_nothing(
        cluster: Cluster, origin: CountingProxy, repo: str) -> None:
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    digest = "sha256:" + "cd" * 32
    connections = origin.connections
    tricks = [
        f"http://evil.example/v2/{repo}/blobs/{digest}",
        f"http://10.0.0.1/v2/{repo}/blobs/{digest}",
        "http://169.254.169.254/latest/meta-data/",
        f"http://[::1]:{origin.port}/v2/{repo}/blobs/{digest}",
        f"http://{origin.host}@evil.example/v2/{repo}/blobs/{digest}",
        f"http://evil.example#@{origin.host}/v2/{repo}/blobs/{digest}",
        f"http://127.0.0.1:{origin.port + 1}/v2/",
        f"http://localhost:{origin.port}/v2/{repo}/blobs/{digest}",
        "http://0.0.0.0/v2/",
        "http://2130706433/v2/",
    ]
    for url in tricks:
        head = f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        status, body = await raw_request(_port(peer), head)
        assert 400 <= status < 500, (url, status, body[:200])
    for header in (f"http://{origin.host}@evil.example", "file:///etc/passwd",
                   "https://169.254.169.254", "gopher://x", "http://[::1"):
        async with aiohttp.ClientSession() as s, s.get(
                f"{peer.url}/v2/{repo}/blobs/{digest}",
                headers={"X-Dragonfly-Registry": header}) as r:
            assert r.status in (400, 403), header
    for ns in (f"{origin.host}@evil.example", "evil.example", "169.254.169.254"):
        async with aiohttp.ClientSession() as s, s.get(
                f"{peer.url}/v2/{repo}/blobs/{digest}", params={"ns": ns}) as r:
            assert r.status == 403, ns
    assert origin.connections == connections, "a refused request reached the registry"


async def test_redirects_into_the_peers_network_are_refused(cluster: Cluster) -> None:
    """An allow-listed registry that redirects blob reads to an internal address (another
    loopback address, cloud metadata) cannot make the peer fetch from there."""
    hits = 0

    async def internal(_: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(body=b"internal secret")

    app = web.Application()
    app.router.add_get("/{tail:.*}", internal)
    inner = web.AppRunner(app)
    await inner.setup()
    internal_port = free_port()
    await web.TCPSite(inner, "127.0.0.2", internal_port).start()

    redirect_to = {"url": ""}

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(redirect_to["url"])

    reg_app = web.Application()
    reg_app.router.add_route("*", "/v2/{tail:.*}", redirect)
    reg = web.AppRunner(reg_app)
    await reg.setup()
    reg_port = free_port()
    await web.TCPSite(reg, "127.0.0.1", reg_port).start()
    try:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, f"http://127.0.0.1:{reg_port}")
        digest = "sha256:" + "ab" * 32
        for to in (f"http://127.0.0.2:{internal_port}/secret",
                   "http://169.254.169.254/latest/meta-data/iam",
                   "http://user:pw@example.com/x", "file:///etc/passwd"):
            redirect_to["url"] = to
            async with aiohttp.ClientSession() as s, \
                    s.get(f"{peer.url}/v2/x/blobs/{digest}") as r:
                body = await r.read()
                assert r.status == 502 and b"refused" in body, (to, r.status, body)
                assert b"internal secret" not in body
        assert hits == 0
    finally:
        await reg.cleanup()
        await inner.cleanup()


async def test_slowloris_does_not_block_other_clients(target: tuple) -> None:
    peer, _, _, blob = target
    slow = []
    for _ in range(30):
        _, writer = await asyncio.open_connection("127.0.0.1", _port(peer))
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(writer)
    try:
        started = asyncio.get_running_loop().time()
        async with aiohttp.ClientSession() as s, \
                s.get(f"{peer.url}{peer.extra['repo_path']}") as r:
            assert await r.read() == blob
        assert asyncio.get_running_loop().time() - started < 5.0
    finally:
        for w in slow:
            w.close()



async def test_two_hundred_concurrent_clients(target: tuple) -> None:
    peer, _, _, blob = target
    rng = random.Random(5)
    ranges = []
    for _ in range(200):
        a = rng.randrange(len(blob))
        ranges.append((a, min(len(blob) - 1, a + rng.randrange(1, 300_000))))

    async def one(s: aiohttp.ClientSession, a: int, b: int) -> bool:
        async with s.get(f"{peer.url}{peer.extra['repo_path']}",
                         headers={"Range": f"bytes={a}-{b}"}) as r:
            return r.status == 206 and await r.read() == blob[a:b + 1]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        results = await asyncio.gather(*(one(s, a, b) for a, b in ranges))
    assert all(results)



_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=25)
_FIELDS = ["id", "peer_id", "task_id", "pieces", "index", "chunk", "length", "piece_size",
           "upload_addr", "wait_ms", "exclude", "kind", "parent_id", "sealed", "progress",
           "epoch", "load", "counters", "digest", "image", "url"]


async def test_scheduler_json_bodies(target: tuple) -> None:
    _, sched, _, _ = target
    port = _port(sched)
    secret = member_secret()  # signed as a member: the bodies reach validation, not a 401

    @given(path=st.sampled_from([
        "/api/v1/peers", "/api/v1/peers/p/heartbeat", "/api/v1/peers/p/leave",
        "/api/v1/tasks", "/api/v1/announce", "/api/v1/schedule", "/api/v1/reports",
        "/api/v1/mismatches", "/api/v1/withdraw", "/api/v1/peers/p/uncordon",
        "/api/v1/preheat"]),
           body=st.one_of(_JSON, st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=8),
                          st.binary(max_size=200)))
    @FUZZ
    def fuzz(path: str, body: object) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"{auth.HEADER}: {auth.sign(secret, 'POST', path, raw)}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
                ).encode() + raw
        status, text = raw_request_sync(port, head)
        assert 200 <= status < 500, (path, raw[:200], status, text[:300])

    fuzz()


async def test_scheduler_state_is_intact_after_the_fuzz(target: tuple) -> None:
    _, sched, digest, _ = target
    async with aiohttp.ClientSession() as s:
        for path in ("/api/v1/peers", "/api/v1/tasks", f"/api/v1/tasks/{digest}",
                     "/api/v1/stats", "/metrics"):
            async with s.get(sched.url + path) as r:
                assert r.status == 200, path


async def _hang_up_after(port: int, path: str, first: int) -> None:
    """GET `path`, read the head and `first` bytes of the body, then reset the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    await reader.readexactly(first)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close
    writer.transport.abort()


async def test_clients_that_hang_up_mid_body_cost_one_line_each(
        target: tuple, registry: Registry, repo: str) -> None:
    """A client gone after the headers, cached (sendfile) or streamed from the origin: the
    peer logs a line, never aiohttp's traceback, and serves the next client exactly."""
    peer = target[0]
    big = os.urandom(24 * MiB)
    path = f"/v2/{repo}/blobs/{await push_blob(registry.url, repo, big)}"
    for first in (1, 1 << 20):
        await _hang_up_after(_port(peer), path, first)  # streamed: not stored yet
        await _hang_up_after(_port(peer), peer.extra["repo_path"], first)  # cached
    async with aiohttp.ClientSession() as s, s.get(f"{peer.url}{path}") as r:
        assert r.status == 200 and await r.read() == big
    logs = peer.proc.logs()
    assert "Traceback" not in logs and "Error handling request" not in logs, logs
