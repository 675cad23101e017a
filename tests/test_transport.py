"""The framed peer-to-peer transport (peer/p2p/): a real upload server (HTTP and framed on one
port) and the real client on loopback; faults from small real servers that speak the frames and
then misbehave (stall, hang up, lie)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from common import ids
from common.limits import ON_DEMAND, PREFETCH, TokenBucket
from common.metrics import PeerMetrics
from common.models import ParentRef, TaskMeta
from common.pieces import PieceLayout
from common.web import ClientLimits, Server
from peer import upload as upload_module
from peer.engine.fetch import ParentFetch
from peer.p2p import client as p2p_client
from peer.p2p import frames
from peer.p2p.client import FramedClient
from peer.p2p.server import FramedEndpoint
from peer.parents import FRAMED, STALL_SECONDS, ParentClient, ParentError, address
from peer.store import ChunkCorrupt, ChunkStore
from peer.upload import UploadServer
from tests.cluster import until
from tests.test_tls import CertAuthority

MiB = 1 << 20
SECRET = b"framed peers share this"


@dataclass
class Parent:
    upload: UploadServer
    server: Server
    chunks: dict[str, bytes]

    @property
    def addr(self) -> str:
        scheme = "https://" if self.server.ssl_context is not None else ""
        return f"{scheme}127.0.0.1:{self.server.port}"


async def _parent(tmp_path: Path, blobs: list[bytes], secret: bytes | None = SECRET,
                  slots: int = 8, tls: ssl.SSLContext | None = None,
                  framed: bool = True, **kwargs: object) -> Parent:
    store = ChunkStore(tmp_path / f"store-{len(list(tmp_path.iterdir()))}")
    store.open()
    meta = TaskMeta(task_id=f"sha256:{1:064x}", length=sum(map(len, blobs)), piece_size=MiB)
    store.put_task(meta)
    chunks = {}
    for i, blob in enumerate(blobs):
        chunks[ids.chunk_id(blob)] = blob
        await store.put_piece(meta.task_id, i, ids.chunk_id(blob), blob)
    upload = UploadServer(store, PeerMetrics(), slots, secret, **kwargs)  # type: ignore[arg-type]
    limits = ClientLimits(header_timeout=2.0)
    server = Server(upload.app(), "127.0.0.1:0", tls, limits,
                    sniffed=FramedEndpoint(upload, limits) if framed else None)
    await server.start()
    return Parent(upload, server, chunks)


@pytest.fixture
async def parents(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Parent]]]:
    made: list[Parent] = []

    async def make(blobs: list[bytes], **kwargs: object) -> Parent:
        p = await _parent(tmp_path, blobs, **kwargs)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        await p.server.stop()
        p.upload.store.close()


@pytest.fixture
async def client() -> AsyncIterator[FramedClient]:
    c = FramedClient(SECRET)
    yield c
    c.close()


async def test_pieces_arrive_exact_many_in_flight_on_few_connections(
        parents: Callable[..., Awaitable[Parent]], client: FramedClient) -> None:
    blobs = [os.urandom(MiB) for _ in range(12)] + [b"compressible " * 80_000]
    p = await parents(blobs, slots=64, per_address=32)
    got = await asyncio.gather(*(client.fetch(p.addr, c, len(b)) for c, b in p.chunks.items()))
    assert [bytes(g) for g in got] == list(p.chunks.values())
    assert p.server.connections.held["127.0.0.1"] <= 2  # at most two carried 13 pieces
    assert p.upload.active == 0
    # Metrics as over HTTP: the compressible chunk travelled packed, so fewer bytes than held.
    sent = p.upload.metrics.registry.get_sample_value("naiad_peer_upload_bytes_total")
    assert sent == p.upload.uploaded and 12 * MiB < sent < sum(map(len, blobs))
    again = await client.fetch(p.addr, next(iter(p.chunks)), MiB)  # the pool is reused
    assert bytes(again) == blobs[0] and p.server.connections.held["127.0.0.1"] <= 2


async def test_http_and_framed_share_the_port(parents: Callable[..., Awaitable[Parent]],
                                              client: FramedClient) -> None:
    blob = os.urandom(MiB)
    p = await parents([blob])
    chunk = ids.chunk_id(blob)
    async with aiohttp.ClientSession() as session:
        http = ParentClient(session, SECRET, framed=client)
        assert await http.fetch(p.addr, chunk, MiB) == blob  # HTTP, as a v1 child would
        assert bytes(await http.fetch(FRAMED + p.addr, chunk, MiB)) == blob
    assert p.upload.uploaded == 2 * MiB


async def test_an_on_demand_piece_overtakes_queued_prefetch_on_one_connection(
        parents: Callable[..., Awaitable[Parent]]) -> None:
    """The piece's priority travels with its REQUEST: while one answer holds the connection's
    turn, an on-demand request asked last is answered before the prefetch queued before it."""
    first = os.urandom(3 * MiB)  # at --upload-rate 1 MiB/s: ~2 s on the wire after the burst
    small = [os.urandom(64 << 10) for _ in range(3)]
    # Uncompressed: an admitted request goes straight to wait for the turn (no packing trial).
    p = await parents([first, *small], slots=8, per_address=8, rate=TokenBucket(MiB),
                      compress=False)
    framed = FramedClient(SECRET, connections=1)
    done: list[str] = []
    async with aiohttp.ClientSession() as session:
        http = ParentClient(session, SECRET, framed=framed)

        async def fetch(name: str, blob: bytes, priority: int) -> bytes:
            data = await http.fetch(FRAMED + p.addr, ids.chunk_id(blob), len(blob), priority)
            done.append(name)
            return bytes(data)

        def admitted(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return p.upload.active == n
            return check
        try:
            async with asyncio.TaskGroup() as tg:
                got = [tg.create_task(fetch("first", first, PREFETCH))]
                await until(admitted(1), 5, "the first answer under way")
                got += [tg.create_task(fetch(f"prefetch-{i}", small[i], PREFETCH))
                        for i in (0, 1)]
                got.append(tg.create_task(fetch("on-demand", small[2], ON_DEMAND)))
                # All four hold upload slots: three wait for the turn the first one holds.
                await until(admitted(4), 5, "every request queued at the parent")
                assert done == [] and p.server.connections.held["127.0.0.1"] == 1
        finally:
            framed.close()
    assert [g.result() for g in got] == [first, *small]
    assert done == ["first", "on-demand", "prefetch-0", "prefetch-1"]


async def test_busy_and_missing_are_told_apart(parents: Callable[..., Awaitable[Parent]],
                                               client: FramedClient) -> None:
    blob = os.urandom(MiB)
    p = await parents([blob], slots=1)
    chunk = ids.chunk_id(blob)
    assert p.upload.admit("127.0.0.2") is None  # another child holds the only slot
    with pytest.raises(ParentError) as busy:
        await client.fetch(p.addr, chunk, MiB)
    assert busy.value.kind == "busy"
    p.upload.release("127.0.0.2")
    assert bytes(await client.fetch(p.addr, chunk, MiB)) == blob
    with pytest.raises(ParentError) as missing:
        await client.fetch(p.addr, ids.chunk_id(b"not held"), 8)
    assert missing.value.kind == "failed" and "missing" in str(missing.value)
    with pytest.raises(ParentError) as wrong:
        await client.fetch(p.addr, chunk, MiB - 1)
    assert wrong.value.kind == "failed"
    assert bytes(await client.fetch(p.addr, chunk, MiB)) == blob  # the connection lives on


async def test_a_full_window_is_busy_without_asking(
        parents: Callable[..., Awaitable[Parent]], client: FramedClient,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent takes one request from an address at once (WELCOME says so): the rest are
    busy at the child, at once, as the parent would have answered them."""
    monkeypatch.setattr(p2p_client, "WINDOW_PATIENCE", 0.001)
    blobs = [os.urandom(4 * MiB) for _ in range(6)]
    p = await parents(blobs, slots=2, per_address=1)
    results = await asyncio.gather(*(client.fetch(p.addr, c, len(b)) for c, b in
                                     p.chunks.items()), return_exceptions=True)
    busy = [r for r in results if isinstance(r, ParentError)]
    assert busy and all(r.kind == "busy" and "window is full" in str(r) for r in busy), results
    served = [r for r in results if not isinstance(r, BaseException)]
    assert served and p.upload.uploaded == 4 * MiB * len(served)


async def test_the_cluster_secret_is_checked_once_per_connection(
        parents: Callable[..., Awaitable[Parent]]) -> None:
    blob = os.urandom(64 << 10)
    p = await parents([blob])
    chunk = ids.chunk_id(blob)
    for secret in (None, b"another cluster"):
        c = FramedClient(secret)
        with pytest.raises(ParentError) as refused:
            await c.fetch(p.addr, chunk, len(blob))
        c.close()
        assert refused.value.kind == "failed" and "refused" in str(refused.value)
    assert p.upload.uploaded == 0
    # A HELLO replayed (the same signature) is refused too: its nonce was taken.
    hello = frames.hello(SECRET)
    answers = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
        writer.write(hello)
        head = frames.parse_header(await reader.readexactly(frames.HEADER.size))
        answers.append((head.kind, await reader.readexactly(head.length)))
        writer.close()
    assert answers[0][0] == frames.WELCOME
    assert answers[1][0] == frames.ERROR and b"replayed" in answers[1][1]


async def test_a_v1_parent_http_only_still_serves_a_v2_child(
        parents: Callable[..., Awaitable[Parent]], client: FramedClient) -> None:
    """A parent before the framed transport registered none (1): the child speaks HTTP to it;
    were it told otherwise, the framed attempt fails cleanly rather than hanging."""
    blob = os.urandom(MiB)
    old = await parents([blob], framed=False)
    chunk = ids.chunk_id(blob)
    ref = ParentRef(id="old", addr=old.addr)
    assert ref.transport == 1 and address(ref) == old.addr
    async with aiohttp.ClientSession() as session:
        assert await ParentClient(session, SECRET, framed=client).fetch(
            address(ref), chunk, MiB) == blob
    with pytest.raises(ParentError) as e:
        await client.fetch(old.addr, chunk, MiB)
    assert e.value.kind in ("failed", "slow")
    assert address(ParentRef(id="new", addr=old.addr, transport=2)) == FRAMED + old.addr


async def test_tls_and_mutual_tls(tmp_path: Path,
                                  parents: Callable[..., Awaitable[Parent]]) -> None:
    ca = CertAuthority(tmp_path / "ca")
    leaf = ca.leaf("parent")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(*leaf)
    server_tls.load_verify_locations(cafile=str(ca.cert))
    server_tls.verify_mode = ssl.CERT_REQUIRED  # mutual: children present certificates
    blobs = [os.urandom(MiB), b"text " * 100_000]
    p = await parents(blobs, tls=server_tls)
    assert p.addr.startswith("https://")
    good = FramedClient(SECRET, tls=ca.client(ca.leaf("child")))
    got = await asyncio.gather(*(good.fetch(p.addr, c, len(b)) for c, b in p.chunks.items()))
    assert [bytes(g) for g in got] == blobs
    good.close()
    for context in (ca.client(), ssl.create_default_context()):  # no cert; CA not trusted
        bad = FramedClient(SECRET, tls=context)
        with pytest.raises(ParentError) as refused:
            await bad.fetch(p.addr, ids.chunk_id(blobs[0]), MiB)
        assert refused.value.kind == "failed", refused.value
        bad.close()


# -- parents that misbehave: small real servers speaking the frames -------------------------------

@dataclass
class FaultyParent:
    """Answers HELLO with WELCOME, then each REQUEST by `behave(writer, request, size,
    chunk)`; `requests` counts them."""
    behave: Callable[[asyncio.StreamWriter, int, int, str], Awaitable[None]]
    requests: int = 0
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> FaultyParent:
        self.server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        return self

    @property
    def addr(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self.tasks.add(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            assert await reader.readexactly(len(frames.PREFACE)) == frames.PREFACE
            head = frames.parse_header(await reader.readexactly(frames.HEADER.size))
            await reader.readexactly(head.length)
            writer.write(frames.welcome(8))
            while True:
                head = frames.parse_header(await reader.readexactly(frames.HEADER.size))
                size, chunk, _ = frames.parse_request(await reader.readexactly(head.length))
                self.requests += 1
                await self.behave(writer, head.request, size, chunk)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _stall(writer: asyncio.StreamWriter, request: int, size: int, chunk: str) -> None:
    writer.write(frames.header(frames.PIECE, request, size) + b"x" * (size // 2))
    await asyncio.Event().wait()  # and nothing more


async def _hang_up(writer: asyncio.StreamWriter, request: int, size: int, chunk: str) -> None:
    writer.write(frames.header(frames.PIECE, request, size) + b"x" * (size // 2))
    await writer.drain()
    writer.transport.abort()


async def test_a_parent_that_stalls_mid_piece_is_slow() -> None:
    async with FaultyParent(_stall) as bad:
        c = FramedClient(SECRET, stall_seconds=0.3)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ParentError) as e:
            await c.fetch(bad.addr, ids.chunk_id(b"x"), MiB)
        assert e.value.kind == "slow"
        assert 0.25 < asyncio.get_running_loop().time() - started < 2
        c.close()


async def test_a_parent_that_hangs_up_mid_piece_fails_only_what_was_in_flight() -> None:
    async with FaultyParent(_hang_up) as bad:
        c = FramedClient(SECRET)
        results = await asyncio.gather(*(c.fetch(bad.addr, ids.chunk_id(bytes([i])), MiB)
                                         for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, ParentError) and r.kind == "failed" for r in results), results
        with pytest.raises(ParentError):  # the next request dials again
            await c.fetch(bad.addr, ids.chunk_id(b"again"), MiB)
        assert bad.requests >= 2
        c.close()


class _Decider:
    def __init__(self) -> None:
        self.reports: list[tuple[str, str]] = []

    def report(self, parent_id: str, task_id: str, piece: int | None, kind: str) -> None:
        self.reports.append((parent_id, kind))


async def test_corrupt_bytes_over_the_frames_are_caught_by_the_engine(tmp_path: Path) -> None:
    blob = os.urandom(MiB)
    chunk = ids.chunk_id(blob)

    async def lie(writer: asyncio.StreamWriter, request: int, size: int, _: str) -> None:
        bad = bytearray(blob)
        bad[size // 2] ^= 0xFF
        writer.write(frames.header(frames.PIECE, request, size) + bad)

    kept: list[int] = []

    async def keep(run: object, index: int, chunk: str, data: bytes, source: str,
                   verify: bool = False) -> None:  # as Engine._keep, without a store
        if not verify or ids.chunk_id(data) != chunk:
            raise ChunkCorrupt(chunk)  # ParentFetch asks for the check; these bytes fail it
        kept.append(index)

    metrics = PeerMetrics()
    decider = _Decider()
    async with FaultyParent(lie) as liar:
        framed = FramedClient(SECRET)
        async with aiohttp.ClientSession() as session:
            fetch = ParentFetch("child", ParentClient(session, SECRET, framed=framed),
                                decider, keep, metrics)  # type: ignore[arg-type]
            # What ParentFetch reads of a run: its layout, priorities and id.
            run = SimpleNamespace(layout=PieceLayout(MiB, MiB), priority={},
                                  task_id=f"sha256:{2:064x}")
            data, failed = await fetch.piece(run, 0, chunk,  # type: ignore[arg-type]
                                             [ParentRef(id="liar", addr=liar.addr,
                                                        transport=2)])
        framed.close()
    assert data is None and failed == {"liar"} and not kept
    assert decider.reports == [("liar", "corrupt")]
    assert metrics.registry.get_sample_value("naiad_peer_verify_failures_total") == 1


async def _receive_fast(framed: FramedClient, p: Parent, mib: int = 128) -> None:
    """A child that has just received `mib` MiB from a parent: fast, as on a busy LAN."""
    chunk, blob = next(iter(p.chunks.items()))
    for _ in range(mib // 16):
        await asyncio.gather(*(framed.fetch(p.addr, chunk, len(blob)) for _ in range(16)))


async def test_a_fast_child_gives_up_on_a_stalled_parent_well_before_stall_seconds(
        parents: Callable[..., Awaitable[Parent]]) -> None:
    """The engine, a child receiving fast: a parent that stops mid-piece is `slow` and the
    next parent asked after its `Patience` (peer/parents.py), not STALL_SECONDS (with its
    read blocked on the piece, the child's link idled that long: bench.sim die1)."""
    blob = os.urandom(MiB)
    chunk = ids.chunk_id(blob)
    good = await parents([blob], slots=64, per_address=32)

    async def keep(run: object, index: int, chunk: str, data: bytes, source: str,
                   verify: bool = False) -> None:
        assert ids.chunk_id(data) == chunk

    decider = _Decider()
    loop = asyncio.get_running_loop()
    async with FaultyParent(_stall) as bad:
        framed = FramedClient(SECRET)
        await _receive_fast(framed, good)
        async with aiohttp.ClientSession() as session:
            fetch = ParentFetch("child", ParentClient(session, SECRET, framed=framed),
                                decider, keep, PeerMetrics())  # type: ignore[arg-type]
            run = SimpleNamespace(layout=PieceLayout(MiB, MiB), priority={},
                                  task_id=f"sha256:{2:064x}")
            started = loop.time()
            data, failed = await fetch.piece(run, 0, chunk,  # type: ignore[arg-type]
                                             [ParentRef(id="stalls", addr=bad.addr,
                                                        transport=2),
                                              ParentRef(id="good", addr=good.addr,
                                                        transport=2)])
            took = loop.time() - started
        framed.close()
    assert data is not None and bytes(data) == blob and failed == {"stalls"}
    assert decider.reports == [("stalls", "slow")]
    assert took < STALL_SECONDS / 2, took


async def test_a_fast_child_gives_up_dialling_a_silent_parent_soon(
        parents: Callable[..., Awaitable[Parent]]) -> None:
    """A parent that accepts and never answers (a dead host's half-open port, a wedged
    process): no WELCOME within the child's patience is `slow`."""
    blob = os.urandom(MiB)
    good = await parents([blob], slots=64, per_address=32)
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    addr = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    framed = FramedClient(SECRET)
    loop = asyncio.get_running_loop()
    try:
        await _receive_fast(framed, good)
        started = loop.time()
        with pytest.raises(ParentError) as e:
            await framed.fetch(addr, ids.chunk_id(blob), MiB)
        took = loop.time() - started
    finally:
        framed.close()
        for w in accepted:
            w.close()
        silent.close()
        await silent.wait_closed()
    assert e.value.kind == "slow" and accepted
    assert took < STALL_SECONDS / 2, took


# -- the upload's bounds, as over HTTP ------------------------------------------------------------

async def test_a_connection_that_says_nothing_or_only_the_preface_is_closed(
        parents: Callable[..., Awaitable[Parent]]) -> None:
    p = await parents([b"x" * 100])  # header deadline 2 s
    loop = asyncio.get_running_loop()
    for opening in (b"", frames.PREFACE, frames.PREFACE[:5]):
        reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
        writer.write(opening)
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the parent
        assert 1.5 < loop.time() - started < 4
        writer.close()


async def test_an_idle_connection_closed_by_the_parent_is_dialled_again(
        tmp_path: Path, client: FramedClient) -> None:
    blob = os.urandom(MiB)
    p = await _parent(tmp_path, [blob])
    try:
        p.server.sniffed.idle = 0.2  # type: ignore[union-attr]
        chunk = ids.chunk_id(blob)
        assert bytes(await client.fetch(p.addr, chunk, MiB)) == blob

        async def closed() -> bool:
            return not p.server.connections.held
        await until(closed, 5, "the idle connection closed by the parent")
        assert bytes(await client.fetch(p.addr, chunk, MiB)) == blob
    finally:
        await p.server.stop()
        p.upload.store.close()


async def test_upload_and_download_rates_pace_the_frames(
        parents: Callable[..., Awaitable[Parent]]) -> None:
    """--upload-rate on the parent, --download-rate on the child: a second's burst, then the
    rate; neither side takes the paced bytes for a stall."""
    blob = os.urandom(2 * MiB)
    chunk = ids.chunk_id(blob)
    loop = asyncio.get_running_loop()
    paced = await parents([blob], rate=TokenBucket(MiB))
    c = FramedClient(SECRET, stall_seconds=0.5)
    started = loop.time()
    assert bytes(await c.fetch(paced.addr, chunk, len(blob))) == blob
    assert 0.9 < loop.time() - started < 3
    c.close()
    free = await parents([blob])
    c = FramedClient(SECRET, stall_seconds=0.5, rate=TokenBucket(4 * MiB))
    started = loop.time()
    for _ in range(5):  # 10 MiB: 4 in the burst, then at most 4 MiB/s
        assert bytes(await c.fetch(free.addr, chunk, len(blob))) == blob
    assert 1.0 < loop.time() - started < 3  # the last piece's wait is the next read's
    c.close()


async def test_a_child_that_stops_reading_is_cut_off(
        parents: Callable[..., Awaitable[Parent]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The minimum send rate holds on the framed path: a child that asks and never reads is
    cut off within about a window, and its slot freed."""
    monkeypatch.setattr(upload_module, "STALL_WINDOW", 1.0)
    caplog.set_level(logging.INFO, upload_module.log.name)
    blob = os.urandom(8 * MiB)  # far more than a non-reading child's buffers take in
    p = await parents([blob], min_rate=512 << 10)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    with sock:
        await loop.sock_connect(sock, ("127.0.0.1", p.server.port))
        await loop.sock_sendall(sock, frames.hello(SECRET)
                                + frames.request(1, ids.chunk_id(blob), len(blob), 4, False))

        async def busy() -> bool:
            return p.upload.active == 1
        await until(busy, 5, "the upload under way")
        started = loop.time()

        async def freed() -> bool:
            return p.upload.active == 0
        await until(freed, 5, "the slot freed")
        assert loop.time() - started < 2.5
    assert "cut off: below 512.0 KiB/s" in caplog.text and p.upload.uploaded == 0


async def test_piece_buffers_are_reused_only_once_let_go(
        parents: Callable[..., Awaitable[Parent]], client: FramedClient) -> None:
    blobs = [os.urandom(MiB) for _ in range(2)]
    p = await parents(blobs)
    (c1, b1), (c2, b2) = p.chunks.items()
    first = await client.fetch(p.addr, c1, MiB)
    held = await client.fetch(p.addr, c2, MiB)  # while `first` is held: another buffer
    assert first is not held and bytes(first) == b1 and bytes(held) == b2
    first_id = id(first)
    del first
    again = await client.fetch(p.addr, c2, MiB)  # into the buffer let go, whole
    assert id(again) == first_id and bytes(again) == b2 and bytes(held) == b2
    assert client.buffers.pooled == 2 * MiB
