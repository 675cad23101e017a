"""Finding 8: upload slots held by clients that never read. An upload that falls below the
minimum send rate (64 KiB/s for about 5 s) is cut off and its slot freed, and one remote address
holds at most half the slots; the rest answer 503 busy at once. Attacks run against live peers
from other loopback addresses (127.0.0.2, ...), with the bytes a neighbour pulls checked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from common import auth, ids
from common.metrics import PeerMetrics
from common.models import TaskMeta
from peer import upload
from peer.store import ChunkStore
from peer.upload import SAMPLES_PER_WINDOW, STALL_WINDOW, SendDeadline, tcp_bytes_acked
from tests.cluster import (
    Cluster,
    CountingProxy,
    Node,
    Registry,
    metric,
    pull_digest,
    push_blob,
    until,
)
from tests.test_tls import CertAuthority

MiB = 1 << 20
PIECE = 4 * MiB  # far more than a non-reading client's socket buffers take in
SECRET = "upload slots are for readers"


def test_deadline_moves_with_what_is_sent() -> None:
    d = SendDeadline(min_rate=1000, window=5.0, now=0.0)
    assert d.at == 5.0
    d.sent(2000, now=1.0)  # 2 s earned, capped at a window ahead of now
    assert d.at == 6.0
    d.sent(100_000, now=2.0)  # reading fast earns no more than a window of credit
    assert d.at == 7.0
    d.paused(3.0)  # our own --upload-rate wait is not the child's fault
    assert d.at == 10.0
    slow = SendDeadline(min_rate=1000, window=5.0, now=0.0)
    for t in range(1, 20):  # 500 bytes/s: half the minimum runs out
        slow.sent(500, now=float(t))
        if slow.at < t:
            break
    assert slow.at < 20.0 and t < 20


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO is read on Linux")


@linux_only
async def test_bytes_acked_counts_what_the_other_end_received() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as sender:
        receiver, _ = server.accept()
        with receiver:
            before = tcp_bytes_acked(sender)
            assert before is not None
            sender.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(receiver.recv(1 << 16))

            async def acked() -> bool:
                return tcp_bytes_acked(sender) == before + 100_000
            await until(acked, 5, "100,000 bytes acknowledged")
    # Not TCP, or closed: None, and the upload falls back to sliced sends.
    a, b = socket.socketpair()
    with a, b:
        assert tcp_bytes_acked(a) is None
    assert tcp_bytes_acked(sender) is None
    assert tcp_bytes_acked(None) is None


WINDOW = 1.0  # the in-process server's STALL_WINDOW: the same rules, five times faster
FLOOR = 512 << 10  # its --upload-min-rate


@dataclass
class Holder:
    """An in-process upload server holding one 4 MiB chunk; `sends`: its sendfile calls."""
    server: upload.UploadServer
    port: int
    chunk: str
    sends: list[int]
    sliced: bool  # TCP_INFO taken away


@pytest.fixture(params=["tcp_info", "sliced"])
async def holder(request: pytest.FixtureRequest, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Holder]:
    """Both ways of measuring progress: the kernel's count, and (the fault: a kernel without
    TCP_INFO) sliced sends."""
    monkeypatch.setattr(upload, "STALL_WINDOW", WINDOW)
    if request.param == "sliced":
        monkeypatch.setattr(upload, "tcp_bytes_acked", lambda sock: None)
    sends: list[int] = []
    real_send = upload.send_file

    async def counted(req: web.BaseRequest, f: object, offset: int, count: int) -> None:
        sends.append(count)
        await real_send(req, f, offset, count)  # type: ignore[arg-type]
    monkeypatch.setattr(upload, "send_file", counted)
    store = ChunkStore(tmp_path / "store")
    store.open()
    blob = os.urandom(PIECE)
    chunk = ids.chunk_id(blob)
    meta = TaskMeta(task_id=f"sha256:{1:064x}", length=PIECE, piece_size=PIECE)
    store.put_task(meta)
    await store.put_piece(meta.task_id, 0, chunk, blob)
    server = upload.UploadServer(store, PeerMetrics(), 8, compress=False, min_rate=FLOOR)
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Holder(server, runner.addresses[0][1], chunk, sends, request.param == "sliced")
    finally:
        await runner.cleanup()
        store.close()


async def _read_at(h: Holder, rate: float) -> tuple[int, float | None, float]:
    """A child that reads the chunk at `rate` bytes/s (0: not at all) through a tiny receive
    buffer, until the server finished sending, cut it off, or 4 windows passed: the bytes it
    got, when the server finished (None if it did not), when it stopped."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    with sock:
        await loop.sock_connect(sock, ("127.0.0.1", h.port))
        await loop.sock_sendall(
            sock, f"GET /chunks/{h.chunk} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        started = loop.time()
        got = 0
        while loop.time() - started < 4 * WINDOW and not h.server.uploaded:
            if rate == 0:
                await asyncio.sleep(0.05)
                if not h.server.active:
                    break
                continue
            await asyncio.sleep(max(0.0, started + got / rate - loop.time()))
            try:
                part = await asyncio.wait_for(loop.sock_recv(sock, 16 << 10), WINDOW)
            except ConnectionResetError:
                break
            if not part:
                break
            got += len(part)
        finished = loop.time() - started if h.server.uploaded else None
        return got, finished, loop.time() - started


async def test_a_child_reading_at_twice_the_minimum_is_never_cut(holder: Holder) -> None:
    got, finished, _ = await _read_at(holder, 2 * FLOOR)
    # The server finished sending (what is left sits in its socket buffer), after the deadline
    # had been in play for more than a window: earned, not a 4 MiB burst.
    assert finished is not None and holder.server.uploaded == PIECE
    assert finished > 1.2 * WINDOW, finished  # with no credit earned, cut at WINDOW
    assert got > WINDOW * FLOOR
    slices = -(-PIECE // holder.server._slice)
    assert len(holder.sends) == (slices if holder.sliced else 1)


async def test_a_child_reading_at_half_the_minimum_is_cut(
        holder: Holder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, upload.log.name)
    got, finished, stopped = await _read_at(holder, FLOOR / 2)
    assert finished is None and got < PIECE
    # Half the rate earns half the time: the credit of a window runs out in about two.
    assert WINDOW < stopped < 3.5 * WINDOW, stopped
    assert "cut off: below 512.0 KiB/s" in caplog.text
    assert holder.server.active == 0


async def test_a_child_that_stops_reading_is_cut_within_a_window(holder: Holder) -> None:
    got, finished, stopped = await _read_at(holder, 0)
    assert finished is None and got == 0
    # A window of credit, plus at most one sampling interval (and the poll's 50 ms).
    assert 0.9 * WINDOW < stopped < WINDOW * (1 + 1 / SAMPLES_PER_WINDOW) + 0.3, stopped
    assert holder.server.active == 0


class Stalled:
    """A client that asks for a chunk and never reads the body: a tiny receive buffer, bound
    to its own loopback address."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def open(cls, port: int, chunk: str, source: str) -> Stalled:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((source, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        path = f"/chunks/{chunk}"
        request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"{auth.HEADER}: {auth.sign(SECRET.encode(), 'GET', path)}\r\n\r\n")
        await loop.sock_sendall(sock, request.encode())
        return cls(sock)

    async def status(self) -> int:
        """The status line's code: reads 12 bytes, no more."""
        got = b""
        while len(got) < 12:
            part = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(self.sock, 12 - len(got)), 10)
            assert part, "closed before a status line"
            got += part
        return int(got[9:12])

    async def rest(self) -> int:
        """Everything still readable until the server closes or resets; how many bytes."""
        total = 0
        with contextlib.suppress(ConnectionResetError):
            while part := await asyncio.wait_for(
                    asyncio.get_running_loop().sock_recv(self.sock, 1 << 16), 10):
                total += len(part)
        return total

    def close(self) -> None:
        self.sock.close()


def _cut_off(node: Node, n: int) -> Callable[[], Awaitable[bool]]:
    """Whether the peer has logged at least n uploads cut off below the minimum rate."""
    async def logged() -> bool:
        return node.proc.logs().count("cut off: below") >= n
    return logged


async def _holder(cluster: Cluster, registry: Registry, origin: CountingProxy,
                  repo: str) -> tuple[Node, bytes, str, list[str]]:
    """A scheduler and a peer holding a three-piece blob, and the blob's chunk ids."""
    blob = os.urandom(3 * PIECE)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler("--cluster-secret", SECRET)
    a = await cluster.peer("a", sched.url, origin.url, "--cluster-secret", SECRET,
                           "--piece-size", "4MiB")
    assert await pull_digest(f"{a.url}/v2/{repo}/blobs/{digest}") == digest
    chunks = [ids.chunk_id(blob[k:k + PIECE]) for k in range(0, len(blob), PIECE)]
    return a, blob, digest, chunks


async def _neighbour_pull(cluster: Cluster, a: Node, origin: CountingProxy, repo: str,
                          digest: str) -> tuple[float, float]:
    """A second peer pulls the blob: how long it took, and how many bytes came from peers."""
    b = await cluster.peer("b", a.extra["scheduler"], origin.url, "--cluster-secret", SECRET)
    started = time.monotonic()
    assert await pull_digest(f"{b.url}/v2/{repo}/blobs/{digest}") == digest
    took = time.monotonic() - started
    return took, await metric(b.url, "naiad_peer_download_bytes_total", {"source": "peer"})


async def test_one_address_holds_at_most_half_the_slots(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    a, blob, digest, chunks = await _holder(cluster, registry, origin, repo)
    # 8 stalled requests from one address: the default per-address cap is 4 of the 8 slots.
    stalled = [await Stalled.open(a.extra["upload"], chunks[0], "127.0.0.2") for _ in range(8)]
    try:
        codes = [await s.status() for s in stalled]
        assert sorted(codes) == [200] * 4 + [503] * 4, codes
        # A neighbour on another address still gets its pieces from a, without waiting for
        # the stalled uploads to be cut off.
        took, from_peers = await _neighbour_pull(cluster, a, origin, repo, digest)
        assert from_peers == len(blob)
        assert took < STALL_WINDOW, took
        # The four held uploads are cut off within a few windows, short of the whole chunk.
        await until(_cut_off(a, 4), 3 * STALL_WINDOW, "stalled uploads cut off")
        held = [s for s, code in zip(stalled, codes, strict=True) if code == 200]
        for s in held:
            assert await s.rest() < PIECE
    finally:
        for s in stalled:
            s.close()


async def test_stalled_uploads_free_every_slot(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    a, blob, digest, chunks = await _holder(cluster, registry, origin, repo)
    # Eight addresses, one stalled request each: every one of the 8 slots is taken.
    stalled = [await Stalled.open(a.extra["upload"], chunks[k % 3], f"127.0.0.{2 + k}")
               for k in range(8)]
    extra = None
    try:
        assert [await s.status() for s in stalled] == [200] * 8
        extra = await Stalled.open(a.extra["upload"], chunks[1], "127.0.0.20")
        assert await extra.status() == 503
        started = time.monotonic()
        # The neighbour's pieces wait on busy parents, not the origin: the slots come free
        # when the stalled uploads are cut off, about a window after they stopped moving
        # (not the 20-40 s the attack held them before).
        took, from_peers = await _neighbour_pull(cluster, a, origin, repo, digest)
        assert from_peers == len(blob)
        assert time.monotonic() - started < 3 * STALL_WINDOW, took
        await until(_cut_off(a, 8), 3 * STALL_WINDOW, "stalled uploads cut off")
        for s in stalled:
            assert await s.rest() < PIECE
    finally:
        for s in stalled + ([extra] if extra else []):
            s.close()


async def test_stalled_uploads_over_tls_are_cut_off_too(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    """Over TLS the chunk is written, not sent by sendfile: the same deadline holds."""
    ca = CertAuthority(tmp_path / "ca")
    cluster.ssl = ca.client()
    blob = os.urandom(PIECE)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler("--cluster-secret", SECRET)
    a = await cluster.peer("a", sched.url, origin.url, "--cluster-secret", SECRET,
                           "--piece-size", "4MiB", tls=ca.leaf("a"))
    async with aiohttp.ClientSession() as s, \
            s.get(f"{a.url}/v2/{repo}/blobs/{digest}", ssl=cluster.ssl) as r:
        assert await r.read() == blob
    path = f"/chunks/{ids.chunk_id(blob)}"
    streams = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", a.extra["upload"]))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=ca.client(),
                                                       server_hostname="127.0.0.1")
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth.HEADER}: "
                     f"{auth.sign(SECRET.encode(), 'GET', path)}\r\n\r\n".encode())
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        streams.append((reader, writer))  # and never read again
    try:
        await until(_cut_off(a, 2), 3 * STALL_WINDOW, "stalled TLS uploads cut off")
        for reader, _ in streams:
            got = 0
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while part := await asyncio.wait_for(reader.read(1 << 16), 10):
                    got += len(part)
            assert got < PIECE
    finally:
        for _, writer in streams:
            writer.close()


@pytest.fixture(autouse=True)
def _loopback_aliases() -> None:
    """The attacks bind to 127.0.0.x: Linux routes all of 127/8 to lo."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            pytest.skip("127.0.0.2 is not usable here")
