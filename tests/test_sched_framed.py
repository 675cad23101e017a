"""The framed scheduler protocol (issue 14): the codec alone; a real scheduler on loopback with
the peer's own scheduler client calling it framed, falling back to HTTP when the scheduler has
framing off (as one from before it), failing calls on a dropped connection and reconnecting,
over TLS; hostile input on raw sockets; and real peers pulling through a real scheduler."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from redis.exceptions import RedisError

from common import auth
from common import callframes as cf
from common.models import (
    Announce,
    AnnounceReply,
    Heartbeat,
    PeerRegistration,
    RegisterReply,
    ScheduleReply,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
)
from common.pieces import MiB
from common.web import ClientLimits
from peer.sched_framed import FramedTransport
from peer.sched_transport import HttpTransport, SchedulerRefused, SchedulerUnavailable
from peer.scheduler_client import SchedulerClient
from scheduler.server import SchedulerConfig, SchedulerService
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    framed_client,
    metric,
    pull_digest,
    push_blob,
    self_signed_cert,
    until,
)

SECRET = b"framed-test-secret-0123456789abcdef"
TASK = "sha256:" + "ab" * 32
API = "/api/v1"


# -- the codec (pure) ----------------------------------------------------------------------

def test_a_call_and_its_reply_round_trip_fed_a_byte_at_a_time() -> None:
    wire = (cf.welcome(7) + cf.call(5, f"{API}/schedule", "1.2.3", "rid-1", b'{"a":1}')
            + cf.reply(5, 503, b'{"error":"x"}') + cf.error("bye"))
    reader = cf.Reader()
    frames = [f for i in range(len(wire)) for f in reader.feed(wire[i:i + 1])]
    assert [f.kind for f in frames] == [cf.WELCOME, cf.CALL, cf.REPLY, cf.ERROR]
    assert cf.parse_welcome(frames[0].body) == (7, cf.MAX_BODY)
    assert cf.parse_call(frames[1]) == cf.Call(5, f"{API}/schedule", "1.2.3", "rid-1",
                                               b'{"a":1}')
    assert (frames[2].call, frames[2].status, frames[2].body) == (5, 503, b'{"error":"x"}')
    assert frames[3].body == b"bye"
    # All at once: the same frames.
    assert reader.feed(wire) == frames
    # No signature, no request id: None, not "".
    call = cf.parse_call(cf.Reader().feed(cf.call(1, f"{API}/tasks", None, None, b""))[0])
    assert (call.signature, call.request_id, call.body) == (None, None, b"")


def test_the_reader_refuses_what_is_no_frame() -> None:
    with pytest.raises(cf.FrameError, match="unknown frame kind"):
        cf.Reader().feed(cf.HEADER.pack(9, 0, 0, 1, 0))
    with pytest.raises(cf.FrameError, match="wrong side"):  # from the header alone
        cf.Reader(kinds=cf.TO_SCHEDULER).feed(cf.HEADER.pack(cf.REPLY, 0, 200, 1, 1 << 20))
    # Told from the header alone: nothing of a too-large body is buffered first.
    with pytest.raises(cf.FrameError, match="byte frame"):
        cf.Reader(max_body=1000).feed(cf.HEADER.pack(cf.CALL, 0, 0, 1, 1000 + 1025))
    with pytest.raises(cf.FrameError, match="byte frame"):
        cf.Reader().feed(cf.HEADER.pack(cf.REPLY, 0, 200, 1, cf.MAX_REPLY + 1))
    with pytest.raises(cf.FrameError, match="byte frame"):
        cf.Reader().feed(cf.HEADER.pack(cf.ERROR, 0, 0, 0, cf.MAX_ERROR + 1))
    bad = cf.Reader().feed(cf.frame(cf.CALL, b"\x00\x09\x00\x00abc", 1))[0]
    with pytest.raises(cf.FrameError, match="shorter"):
        cf.parse_call(bad)
    with pytest.raises(cf.FrameError, match="short"):
        cf.parse_call(cf.Frame(cf.CALL, 0, 1, b"\x00"))
    with pytest.raises(cf.FrameError, match="ASCII"):
        cf.parse_call(cf.Frame(cf.CALL, 0, 1, b"\x00\x01\x00\x00\xff"))
    with pytest.raises(cf.FrameError, match="version"):
        cf.parse_welcome(cf.Reader().feed(cf.frame(cf.WELCOME, b"\x00\x09\x00\x01\x00\x00"
                                                   b"\x00\x01"))[0].body)


def test_only_the_hot_routes_are_framed() -> None:
    assert cf.route(f"{API}/schedule") == ("schedule", None)
    assert cf.route(f"{API}/peers") == ("peers", None)
    assert cf.route(f"{API}/peers/p-1/heartbeat") == ("heartbeat", "p-1")
    assert cf.route(f"{API}/peers/p-1/work") == ("work", "p-1")
    for path in (f"{API}/peers/p-1", f"{API}/peers/p-1/uncordon", f"{API}/access",
                 f"{API}/stats", f"{API}/schedule/x", "/metrics", f"{API}/peers/a/b/leave"):
        assert cf.route(path) is None, path
    # An HTTP request line never starts with the preface.
    assert not cf.PREFACE.startswith((b"GET", b"POST", b"HEAD", b"PUT", b"DELETE"))


# -- a real scheduler on loopback -------------------------------------------------------------

@pytest.fixture
async def scheduler(request: pytest.FixtureRequest) -> AsyncIterator[SchedulerService]:
    framed = getattr(request, "param", True)
    svc = SchedulerService(SchedulerConfig(listen="127.0.0.1:0", udp=None, secret=SECRET,
                                           framed=framed, heartbeat_interval=5.0,
                                           limits=ClientLimits(header_timeout=1.0)))
    await svc.start()
    yield svc
    await svc.stop()


def _reg(name: str) -> PeerRegistration:
    return PeerRegistration(id=name, upload_addr="127.0.0.1:9")


class _Nothing:
    def tasks(self) -> list:
        return []

    def drop_task(self, task_id: str) -> None:
        pass


async def _framed_calls(url: str, route: str) -> float:
    try:
        return await metric(url, "naiad_scheduler_framed_calls_total", {"route": route})
    except KeyError:
        return 0.0


@pytest.mark.parametrize("scheduler", [True, False], ids=["framed", "framing-off"],
                         indirect=True)
async def test_the_peers_client_calls_framed_or_falls_back(
        scheduler: SchedulerService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "naiad.peer.scheduler")
    framed = scheduler.config.framed
    async with aiohttp.ClientSession() as http:
        client = SchedulerClient([scheduler.url], _reg("me"), http, _Nothing(),  # type: ignore[arg-type]
                                 Heartbeat, SECRET)
        assert isinstance(client.transport, FramedTransport)
        await client.start()
        try:
            await asyncio.wait_for(client.connected.wait(), 10)
            await client.ensure_task(TaskRequest(task_id=TASK, length=8 * MiB, piece_size=MiB))
            client.announce(TASK, 0, "blake3:" + "0" * 64)
            decisions = await client.schedule(TASK, [1, 2], set(), 0)
            assert [d.action for d in decisions] == ["source", "source"]
            await until(lambda: _true(_holds(scheduler, "me", 0)), 5, "the claim recorded")
        finally:
            await client.stop()
        await until(lambda: _true(not scheduler.store.state.peers), 5, "the peer left")
    if framed:
        assert client.transport.framed >= 4  # register, task, schedule, leave
        assert await _framed_calls(scheduler.url, "schedule") >= 1
        assert await _framed_calls(scheduler.url, "peers") == 1
        assert "takes no framed calls" not in caplog.text
    else:  # as an older scheduler: the preface got HTTP's 400; remembered, asked over HTTP
        assert client.transport.framed == 0
        assert await _framed_calls(scheduler.url, "schedule") == 0
        assert caplog.text.count("takes no framed calls") == 1


def _true(value: bool) -> asyncio.Future[bool]:
    f: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    f.set_result(value)
    return f


def _holds(svc: SchedulerService, peer: str, piece: int) -> bool:
    task = svc.store.state.tasks.get(TASK)  # type: ignore[attr-defined]
    return task is not None and peer in task.pieces[piece].holders


async def test_refusals_and_store_failures_are_answered_as_over_http(
        scheduler: SchedulerService, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*_: object) -> None:
        raise RedisError("Connection refused")

    monkeypatch.setattr(scheduler.store, "announce", down)  # the fault: the store is down
    ann = Announce(peer_id="a", task_id=TASK, pieces=[])
    async with aiohttp.ClientSession() as http:
        framed = FramedTransport(HttpTransport(http, SECRET), SECRET)
        plain = HttpTransport(http, SECRET)
        try:
            for t in (framed, plain):
                with pytest.raises(SchedulerRefused) as e:  # unknown peer: the code too
                    await t.post(scheduler.url, f"{API}/peers/ghost/heartbeat", Heartbeat(),
                                 None)
                assert (e.value.status, e.value.code) == (404, "unknown-peer")
                with pytest.raises(SchedulerRefused, match="400: invalid request body"):
                    await t.post(scheduler.url, f"{API}/tasks",
                                 TaskRequest.model_construct(task_id="nope"), TaskMeta)
                with pytest.raises(SchedulerUnavailable, match="503: scheduler state store "
                                                               "unavailable") as u:
                    await t.post(scheduler.url, f"{API}/announce", ann, AnnounceReply)
                assert not u.value.unusable  # briefly unavailable: retried, not failed over
            assert framed.framed == 3  # all three went framed
            assert await _framed_calls(scheduler.url, "heartbeat") == 0  # counts answers
        finally:
            await framed.close()


async def test_a_dropped_connection_fails_its_calls_and_the_next_call_reconnects(
        scheduler: SchedulerService) -> None:
    url = scheduler.url
    async with framed_client(SECRET) as (_http, t):
        await _a_leases_piece_0(t, url)
        # b's call long-polls on a's lease: in flight, its connection is dropped.
        waiting = asyncio.create_task(t.post(url, f"{API}/schedule", ScheduleRequest(
            peer_id="b", task_id=TASK, pieces=[0], wait_ms=20_000), ScheduleReply, 25))
        assert scheduler.framed is not None
        await until(lambda: _true(_parked(scheduler)), 5, "b's call parked")
        started = time.monotonic()
        for c in list(scheduler.framed.connections):
            c.abort()
        with pytest.raises(SchedulerUnavailable, match="connection lost") as e:
            await waiting
        assert e.value.unusable  # as a broken HTTP connection: the session fails over
        assert time.monotonic() - started < 5
        # The next call connects again, framed.
        before = t.framed
        reply = await t.post(url, f"{API}/schedule", ScheduleRequest(
            peer_id="a", task_id=TASK, pieces=[1], wait_ms=0), ScheduleReply)
        assert reply is not None and t.framed == before + 1
        assert len(scheduler.framed.connections) == 1


async def _a_leases_piece_0(t: FramedTransport, url: str) -> None:
    """Peers a and b registered, a 4-piece task, and a holding piece 0's origin lease."""
    for name in ("a", "b"):
        await t.post(url, f"{API}/peers", _reg(name), RegisterReply)
    await t.post(url, f"{API}/tasks",
                 TaskRequest(task_id=TASK, length=4 * MiB, piece_size=MiB), TaskMeta)
    lease = await t.post(url, f"{API}/schedule", ScheduleRequest(
        peer_id="a", task_id=TASK, pieces=[0], wait_ms=0), ScheduleReply)
    assert lease is not None and lease.decisions[0].action == "source"


def _parked(svc: SchedulerService) -> bool:
    return any(c.inflight for c in (svc.framed.connections if svc.framed else ()))


async def test_many_calls_in_flight_on_one_connection(scheduler: SchedulerService) -> None:
    """A long poll holds nothing up: other calls on the same connection are answered."""
    url = scheduler.url
    async with framed_client(SECRET) as (_http, t):
        await _a_leases_piece_0(t, url)
        polls = [asyncio.create_task(t.post(url, f"{API}/schedule", ScheduleRequest(
            peer_id="b", task_id=TASK, pieces=[0], wait_ms=10_000), ScheduleReply, 15))
            for _ in range(3)]
        for _ in range(20):
            await t.post(url, f"{API}/peers/a/heartbeat", Heartbeat(), None, seconds=2)
        assert not any(p.done() for p in polls)
        assert scheduler.framed is not None
        assert len(scheduler.framed.connections) == 1
        for p in polls:
            p.cancel()


async def test_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    svc = SchedulerService(SchedulerConfig(listen="127.0.0.1:0", udp=None, secret=SECRET,
                                           tls=server_tls))
    await svc.start()
    try:
        assert svc.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as http:
            t = FramedTransport(HttpTransport(http, SECRET), SECRET, tls=trust)
            try:
                reply = await t.post(svc.url, f"{API}/peers", _reg("a"), RegisterReply)
                assert reply is not None and t.framed == 1
            finally:
                await t.close()
            # Not trusted: no framed call, and no fallback to anything unverified either.
            t = FramedTransport(HttpTransport(http, SECRET), SECRET,
                                tls=ssl.create_default_context())
            try:
                with pytest.raises(SchedulerUnavailable):
                    await t.post(svc.url, f"{API}/peers", _reg("a"), RegisterReply)
            finally:
                await t.close()
        # Plain bytes to the TLS port: the preface never reaches the framed edge.
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.server.port)
        writer.write(cf.PREFACE)
        assert not (await reader.read(100)).startswith(cf.HEADER.pack(cf.WELCOME, 0, 0, 0, 8)[:1])
        writer.close()
    finally:
        await svc.stop()


# -- hostile input on raw sockets --------------------------------------------------------------

async def _open(svc: SchedulerService) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.server.port)
    writer.write(cf.PREFACE)
    head = await reader.readexactly(cf.HEADER.size)
    kind, _, _, _, length = cf.HEADER.unpack(head)
    assert kind == cf.WELCOME
    window, max_body = cf.parse_welcome(await reader.readexactly(length))
    assert (window, max_body) == (256, cf.MAX_BODY)
    return reader, writer


async def _frames(reader: asyncio.StreamReader, n: int = 1) -> list[cf.Frame]:
    got: list[cf.Frame] = []
    r = cf.Reader()
    while len(got) < n:
        data = await asyncio.wait_for(reader.read(1 << 16), 5)
        if not data:
            break
        got += r.feed(data)
    return got


async def _closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1 << 16), 5) == b""


@pytest.mark.parametrize("sent, says", [
    (cf.HEADER.pack(cf.CALL, 0, 0, 1, cf.MAX_BODY + 2048), "byte frame"),
    (cf.HEADER.pack(9, 0, 0, 1, 0), "unknown frame kind"),
    (cf.reply(1, 200, b"{}"), "kind 3 sent to the wrong side"),
    (cf.HEADER.pack(cf.REPLY, 0, 200, 1, cf.MAX_REPLY), "kind 3 sent to the wrong side"),
    (cf.frame(cf.CALL, b"\x00\x05", 1), "CALL too short"),
], ids=["oversized", "unknown-kind", "a-reply", "a-huge-reply", "short-call"])
async def test_malformed_frames_get_an_error_and_the_connection_closed(
        scheduler: SchedulerService, caplog: pytest.LogCaptureFixture, sent: bytes,
        says: str) -> None:
    caplog.set_level("WARNING", "naiad.scheduler.framed")
    reader, writer = await _open(scheduler)
    writer.write(sent)
    frames = await _frames(reader)
    assert [f.kind for f in frames] == [cf.ERROR] and says in frames[0].body.decode()
    assert await _closed(reader)
    writer.close()
    lines = [r for r in caplog.records if r.name == "naiad.scheduler.framed"]
    assert len(lines) == 1 and says in lines[0].getMessage()
    assert not any(r.exc_info for r in caplog.records), "a line, never a traceback"


async def test_more_calls_in_flight_than_the_window_closes_the_connection(
        scheduler: SchedulerService) -> None:
    reader, writer = await _open(scheduler)
    body = b'{"peer_id":"x","task_id":"' + TASK.encode() + b'","pieces":[0]}'
    writer.write(b"".join(cf.call(i, f"{API}/schedule", None, None, body)
                          for i in range(1, 258)))  # one read of them all: none answered yet
    frames = await _frames(reader, 300)
    assert frames and frames[-1].kind == cf.ERROR
    assert b"more than 256 calls in flight" in frames[-1].body
    writer.close()


async def test_unsigned_or_replayed_calls_are_refused(scheduler: SchedulerService) -> None:
    reader, writer = await _open(scheduler)
    body = _reg("sneaky").model_dump_json().encode()
    path = f"{API}/peers"
    sig = auth.sign(SECRET, "POST", path, body)
    wrong = auth.sign(b"not-the-secret-0123456789abcdef!", "POST", path, body)
    other_path = auth.sign(SECRET, "POST", f"{API}/tasks", body)
    writer.write(cf.call(1, path, None, None, body) + cf.call(2, path, wrong, None, body)
                 + cf.call(3, path, other_path, None, body))
    got = {f.call: f for f in await _frames(reader, 3)}
    assert {c: f.status for c, f in got.items()} == {1: 401, 2: 401, 3: 401}
    assert b"cluster secret required" in got[1].body
    assert "sneaky" not in scheduler.store.state.peers  # type: ignore[attr-defined]
    writer.write(cf.call(4, path, sig, "my-request-1", body))
    writer.write(cf.call(5, path, sig, None, body))  # the same signature again
    got = {f.call: f for f in await _frames(reader, 2)}
    assert (got[4].status, got[5].status) == (200, 401)
    assert b"replayed" in got[5].body
    # A route the edge does not serve is a 404, the connection stays.
    writer.write(cf.call(6, f"{API}/stats", sig, None, b""))
    assert (await _frames(reader))[0].status == 404
    # One nonce cache for both edges: a signature an HTTP call used is no good framed.
    used = auth.sign(SECRET, "POST", path, body)
    async with aiohttp.ClientSession() as http, http.post(
            scheduler.url + path, data=body, headers={auth.HEADER: used}) as r:
        assert r.status == 200
    writer.write(cf.call(7, path, used, None, body))
    got7 = (await _frames(reader))[0]
    assert got7.status == 401 and b"replayed" in got7.body
    writer.close()


async def test_the_preface_is_under_the_header_deadline(scheduler: SchedulerService) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", scheduler.server.port)
    started = time.monotonic()
    writer.write(cf.PREFACE[:5])  # a slow start: never told apart from HTTP
    assert await _closed(reader)
    assert time.monotonic() - started < 4  # the 1 s deadline, not never
    writer.close()


# -- real peers pulling through a real scheduler -------------------------------------------------

async def test_real_peers_pull_over_framed_calls(cluster: Cluster, registry: Registry,
                                                 origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(6 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a = await cluster.peer("a", sched.url, origin.url)
    b = await cluster.peer("b", sched.url, origin.url)
    assert await pull_digest(f"{a.url}/v2/{repo}/blobs/{digest}") == digest
    before = origin.bytes_down
    assert await pull_digest(f"{b.url}/v2/{repo}/blobs/{digest}") == digest
    assert origin.bytes_down - before < MiB  # b was sent to a
    assert await _framed_calls(sched.url, "peers") >= 2
    assert await _framed_calls(sched.url, "schedule") >= 2
    assert "takes no framed calls" not in a.proc.logs() + b.proc.logs()


async def test_no_framed_calls_answers_the_preface_as_http(cluster: Cluster) -> None:
    """`naiad scheduler --no-framed-calls`: what a scheduler from before framed calls does
    with the preface (its HTTP parser answers 400), so peers call it over HTTP."""
    sched = await cluster.scheduler("--no-framed-calls")
    reader, writer = await asyncio.open_connection("127.0.0.1", sched.extra["port"])
    writer.write(cf.PREFACE)
    answer = await asyncio.wait_for(reader.read(12), 5)
    assert answer.startswith(b"HTTP/1.") and answer.endswith(b" 400")
    writer.close()
    framed = await cluster.scheduler()
    reader, writer = await asyncio.open_connection("127.0.0.1", framed.extra["port"])
    writer.write(cf.PREFACE)
    head = await asyncio.wait_for(reader.readexactly(cf.HEADER.size), 5)
    assert cf.HEADER.unpack(head)[0] == cf.WELCOME
    writer.close()
