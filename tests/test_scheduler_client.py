"""The peer's scheduler client, part by part (peer/sched_*.py), each through its seam with a
small in-process fake; replies from small real servers that answer garbage; and live: a first
`--scheduler` URL that answers garbage, a second that is a real scheduler — the peers fail over
to it and pull from each other."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel

from common import datagram
from common.models import (
    UNKNOWN_PEER,
    Announce,
    AnnounceReply,
    Heartbeat,
    PeerRegistration,
    PieceClaim,
    RegisterReply,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
    Withdraw,
)
from peer.sched_heartbeats import UDP_RETRY_EVERY, Heartbeats, UdpBeacon
from peer.sched_outbox import Outbox
from peer.sched_reannounce import reannounce
from peer.sched_session import FailoverSession, Silences, registration_order
from peer.sched_transport import (
    HttpTransport,
    SchedulerRefused,
    SchedulerUnavailable,
    parse_reply,
)
from peer.store import StoredTask
from scheduler.state import ClusterState
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    fetch,
    free_port,
    member_session,
    push_blob,
    serve,
    until,
    wait_registered_peer,
)

TASK = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
REG = PeerRegistration(id="me", upload_addr="127.0.0.1:9")
MiB = 1 << 20


def chunk(n: int) -> str:
    return f"blake3:{n:064x}"


def reply_json(**kw: object) -> bytes:
    return RegisterReply(peer_id="me", heartbeat_interval=0.5, scheduler_id="s",
                         **kw).model_dump_json().encode()  # type: ignore[arg-type]


# --- transport: what counts as a reply ----------------------------------------------------

@pytest.mark.parametrize(("status", "raw"), [
    (200, b"<html><body>Welcome to nginx!</body></html>"),
    (200, b'{"peer_id": 5}'),  # JSON of the wrong shape
    (200, b'{"peer_id": "me", "heartbeat_interval": 0.5, "sched'),  # truncated
    (200, b""),  # no body
    (200, b"\xff\xfe\x00garbage"),
    (204, b""),
    (302, b""),
    (101, b""),
    (404, b"<html>Not Found</html>"),
    (401, b'{"detail": "no"}'),  # JSON, but not a naiad error body
    (500, b"Internal Server Error"),
    (502, b"<html>Bad Gateway</html>"),
    (418, b"I'm a teapot"),
])
def test_a_reply_that_does_not_parse_makes_the_scheduler_unusable(status: int,
                                                                   raw: bytes) -> None:
    with pytest.raises(SchedulerUnavailable) as e:
        parse_reply(status, raw, RegisterReply, "http://x")
    assert e.value.unusable


def test_an_acknowledgement_must_be_a_json_object() -> None:
    assert parse_reply(200, b"{}", None, "x") is None
    for raw in (b"", b"ok", b"[]", b"<html/>"):
        with pytest.raises(SchedulerUnavailable):
            parse_reply(200, raw, None, "x")


def test_a_schedulers_own_answers_parse() -> None:
    assert parse_reply(200, reply_json(), RegisterReply, "x").heartbeat_interval == 0.5
    with pytest.raises(SchedulerRefused) as refused:
        parse_reply(404, b'{"error": "unknown peer me: register first", "code": "unknown-peer"}',
                    None, "x")
    assert (refused.value.status, refused.value.code) == (404, UNKNOWN_PEER)
    with pytest.raises(SchedulerRefused) as plain:
        parse_reply(409, b'{"error": "task has length 5"}', None, "x")
    assert plain.value.code is None
    with pytest.raises(SchedulerUnavailable) as busy:  # a scheduler whose Redis is down
        parse_reply(503, b'{"error": "scheduler state store unavailable"}', None, "x")
    assert not busy.value.unusable


class Garbage:
    """A small real HTTP server answering every request the way its `mode` says."""

    MODES = ("html", "wrong-shape", "truncated", "empty", "redirect", "html-404", "html-500",
             "teapot", "registers-then-html")

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        await request.read()
        mode = self.mode
        if mode == "registers-then-html":
            if request.path == "/api/v1/peers":
                return web.Response(body=reply_json(), content_type="application/json")
            mode = "html"
        if mode == "html":
            return web.Response(text="<html><body>It works!</body></html>",
                                content_type="text/html")
        if mode == "wrong-shape":
            return web.json_response({"status": "ok", "peers": []})
        if mode == "empty":
            return web.Response(status=200)
        if mode == "redirect":
            raise web.HTTPFound("/login")
        if mode == "html-404":
            return web.Response(status=404, text="<h1>Not Found</h1>", content_type="text/html")
        if mode == "html-500":
            return web.Response(status=500, text="<h1>Oops</h1>", content_type="text/html")
        if mode == "teapot":
            return web.Response(status=418, text="I'm a teapot")
        assert mode == "truncated"
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 400
        await resp.prepare(request)
        await resp.write(reply_json()[:30])
        assert request.transport is not None
        request.transport.close()  # cut off mid-body
        return resp

    async def __aenter__(self) -> Garbage:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = await serve(app, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("mode", [m for m in Garbage.MODES if m != "registers-then-html"])
async def test_http_transport_over_a_real_server_answering_garbage(
        http: aiohttp.ClientSession, mode: str) -> None:
    async with Garbage(mode) as g:
        with pytest.raises(SchedulerUnavailable) as e:
            await HttpTransport(http, b"k" * 32).post(g.url, "/api/v1/peers", REG,
                                                      RegisterReply, 2.0)
        assert e.value.unusable
        assert g.requests == ["/api/v1/peers"]  # the redirect was not followed


async def _raw_server(answer: bytes | None) -> tuple[asyncio.Server, str]:
    """A TCP port that answers `answer` (not HTTP) and closes, or never answers (None)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        if answer is None:
            await asyncio.sleep(30)
        writer.write(answer or b"")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.2\r\n", b"", b"HTTP/1.1 200 OK\r\nCont",
                                    None])
async def test_http_transport_over_a_port_that_does_not_speak_http(
        http: aiohttp.ClientSession, answer: bytes | None) -> None:
    server, url = await _raw_server(answer)
    try:
        with pytest.raises(SchedulerUnavailable) as e:
            await HttpTransport(http, None).post(url, "/api/v1/peers", REG, RegisterReply, 0.5)
        assert e.value.unusable
    finally:
        server.close()


# --- the failover session -----------------------------------------------------------------

Answer = Callable[[str, BaseModel | None], object]


def ok_register(udp: str | None = None) -> Answer:
    def answer(path: str, body: BaseModel | None) -> object:
        if path == "/api/v1/peers":
            return RegisterReply(peer_id="me", heartbeat_interval=0.25, udp_addr=udp,
                                 scheduler_id="s")
        return None
    return answer


def raises(e: Exception) -> Answer:
    def answer(path: str, body: BaseModel | None) -> object:
        raise e
    return answer


class FakeTransport:
    """Answers by URL: a function of (path, body) that returns the reply or raises."""

    def __init__(self, **by_url: Answer) -> None:
        self.by_url = {f"http://{k}": v for k, v in by_url.items()}
        self.calls: list[tuple[str, str]] = []

    async def post(self, url: str, path: str, body: BaseModel | None, reply: type | None,
                   seconds: float = 5.0) -> object:
        self.calls.append((url.removeprefix("http://"), path))
        return self.by_url[url](path, body)


def test_silences_remember_a_gap_after_the_scheduler_answers_again() -> None:
    s = Silences()
    assert s.longest(10.0, 12.0) == 2.0, "never answered: silent since the run began"
    for t in (10.0, 10.1, 10.2):
        s.answered(t)
    assert s.longest(10.0, 10.3) == pytest.approx(0.1)
    s.answered(12.7)  # an outage of 2.5 s, then answers again
    s.answered(12.8)
    assert s.longest(10.0, 12.9) == pytest.approx(2.5), "the gap counts though it ended"
    assert s.longest(12.75, 12.9) == pytest.approx(0.1), "a gap before `since` does not"
    assert s.longest(11.0, 12.9) == pytest.approx(1.7), "only its part after `since`"
    assert s.longest(12.8, 16.0) == pytest.approx(3.2), "the current silence"


def test_registration_order_puts_the_lost_url_last() -> None:
    assert registration_order(3, None) == [0, 1, 2]
    assert registration_order(3, 0) == [1, 2, 0]
    assert registration_order(3, 2) == [0, 1, 2]


async def test_registration_skips_unusable_and_refusing_schedulers() -> None:
    t = FakeTransport(bad=raises(SchedulerUnavailable("html")),
                      refusing=raises(SchedulerRefused(401, "bad signature")),
                      good=ok_register("0.0.0.0:7000"))
    s = FailoverSession(["http://bad", "http://refusing", "http://good/"], REG, t)
    assert await s.register()
    assert s.url == "http://good" and s.session_id == 1 and s.interval == 0.25
    assert s.udp_target == ("good", 7000)  # "listens everywhere": the host of its URL
    assert [u for u, _ in t.calls] == ["bad", "refusing", "good"]


async def test_an_unusable_reply_ends_the_session_and_that_url_is_tried_last() -> None:
    t = FakeTransport(a=ok_register(), b=ok_register())
    s = FailoverSession(["http://a", "http://b"], REG, t)
    assert await s.register() and s.url == "http://a"
    s.registered.set()
    t.by_url["http://a"] = raises(SchedulerUnavailable("200 with HTML"))
    with pytest.raises(SchedulerUnavailable):
        await s.post("/api/v1/announce", None, AnnounceReply)
    assert not s.registered.is_set()
    t.by_url["http://a"] = ok_register()  # it answers again, but it was just lost: b first
    t.calls.clear()
    assert await s.register() and s.url == "http://b"
    assert t.calls == [("b", "/api/v1/peers")]


async def test_register_first_is_told_by_the_code_not_the_message() -> None:
    t = FakeTransport(a=ok_register(), b=ok_register())
    s = FailoverSession(["http://a", "http://b"], REG, t)
    await s.register()
    s.registered.set()
    t.by_url["http://a"] = raises(SchedulerRefused(404, "unknown task: register first"))
    with pytest.raises(SchedulerRefused):
        await s.post("/api/v1/tasks", None, TaskMeta)
    assert s.registered.is_set()  # a message is not a code
    t.by_url["http://a"] = raises(SchedulerRefused(404, "who?", UNKNOWN_PEER))
    with pytest.raises(SchedulerRefused):
        await s.post("/api/v1/tasks", None, TaskMeta)
    assert not s.registered.is_set()
    t.by_url["http://a"] = ok_register()
    assert await s.register() and s.url == "http://a"  # forgotten, not broken: same one


async def test_a_late_failure_from_an_older_session_is_ignored() -> None:
    t = FakeTransport(a=ok_register())
    s = FailoverSession(["http://a"], REG, t)
    await s.register()
    old = s.session_id
    await s.register()
    s.registered.set()
    s.lost(old, "late")
    assert s.registered.is_set()
    s.lost(s.session_id, "now")
    assert not s.registered.is_set()


async def test_a_scheduler_that_is_briefly_unavailable_keeps_the_session() -> None:
    t = FakeTransport(a=ok_register())
    s = FailoverSession(["http://a"], REG, t)
    await s.register()
    s.registered.set()
    t.by_url["http://a"] = raises(SchedulerUnavailable("503: redis down", unusable=False))
    with pytest.raises(SchedulerUnavailable):
        await s.post("/api/v1/schedule", None, None)
    assert s.registered.is_set()


async def test_the_session_loop_announces_then_connects_and_fails_over() -> None:
    t = FakeTransport(a=ok_register(), b=ok_register())
    announced: list[str] = []

    async def on_registered() -> None:
        announced.append(s.url)

    s = FailoverSession(["http://a", "http://b"], REG, t, on_registered)
    loop = asyncio.create_task(s.run())
    try:
        await asyncio.wait_for(s.connected.wait(), 5)
        assert announced == ["http://a"]
        t.by_url["http://a"] = raises(SchedulerUnavailable("gone"))
        s.lost(s.session_id, "gone")
        await until(lambda: _true(s.connected.is_set() and s.url == "http://b"), 5, "failover")
        assert announced == ["http://a", "http://b"]
    finally:
        loop.cancel()


async def _true(value: bool) -> bool:
    return value


# --- heartbeats -------------------------------------------------------------------------

class FakeLink:
    """A datagram socket whose answers the test gives: bytes, or None for silence."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.sent: list[bytes] = []
        self.closed = False

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def recv(self) -> bytes:
        answer = self.answers.pop(0) if self.answers else None
        if answer is None:
            await asyncio.Event().wait()
        assert answer is not None
        return answer

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeBeatSession:
    registration: PeerRegistration = REG
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    session_id: int = 1
    interval: float = 0.1
    udp_target: tuple[str, int] | None = ("127.0.0.1", 9)
    http: Answer = field(default_factory=lambda: lambda path, body: None)
    posts: list[str] = field(default_factory=list)
    losses: list[tuple[int | None, bool]] = field(default_factory=list)

    async def post(self, path: str, body: BaseModel | None, reply: type | None,
                   seconds: float = 5.0, session: int | None = None) -> object:
        self.posts.append(path)
        return self.http(path, body)

    def lost(self, session: int | None = None, why: str = "", avoid: bool = True) -> None:
        self.losses.append((session, avoid))


def beater(answers: list[bytes | None], **kw: object) -> tuple[Heartbeats, FakeBeatSession,
                                                                list[FakeLink]]:
    links: list[FakeLink] = []

    async def connect(target: tuple[str, int]) -> FakeLink:
        links.append(FakeLink(answers))
        return links[-1]
    session = FakeBeatSession(**kw)  # type: ignore[arg-type]
    return Heartbeats(session, Heartbeat, UdpBeacon(b"k" * 32, connect)), session, links


async def test_an_answered_datagram_is_a_heartbeat() -> None:
    hb, s, links = beater([datagram.ACK_OK])
    assert await hb.beat(1)
    assert hb.beats == {"udp": 1} and s.posts == [] and s.losses == []
    assert datagram.decode(links[0].sent[0], b"k" * 32, time.time()).peer_id == "me"


async def test_an_unanswered_datagram_is_carried_over_http_at_once() -> None:
    hb, s, _ = beater([None])
    assert await hb.beat(1)
    assert hb.beats == {"http": 1} and s.posts == ["/api/v1/peers/me/heartbeat"]
    assert s.losses == []


async def test_unanswered_and_http_failing_ends_the_session_within_the_beat() -> None:
    hb, s, _ = beater([None], http=raises(SchedulerUnavailable("connection refused")),
                      interval=0.4)
    started = time.monotonic()
    assert not await hb.beat(7)
    assert s.losses == [(7, True)]  # lost, and that scheduler tried last
    assert time.monotonic() - started < s.interval  # well inside one interval


async def test_unknown_answer_means_register_again_with_the_same_scheduler() -> None:
    hb, s, _ = beater([datagram.ACK_UNKNOWN])
    assert await hb.beat(3)
    assert s.losses == [(3, False)] and s.posts == []


async def test_a_heartbeat_whose_report_cannot_be_measured_still_beats(
        caplog: pytest.LogCaptureFixture) -> None:
    hb, _, links = beater([datagram.ACK_OK, datagram.ACK_OK])

    def broken() -> Heartbeat:
        raise FileNotFoundError("/data gone")
    hb.body = broken
    assert await hb.beat(1) and await hb.beat(1)
    assert hb.beats == {"udp": 2}
    beat = datagram.decode(links[0].sent[0], b"k" * 32, time.time())
    assert beat.heartbeat == Heartbeat()
    warned = [r.getMessage() for r in caplog.records if "no load report" in r.getMessage()]
    assert warned == ["heartbeats carry no load report: FileNotFoundError: /data gone"]


async def test_udp_that_stopped_getting_through_is_tried_only_now_and_then() -> None:
    hb, _, links = beater([])  # never answers
    for _ in range(2 + 2 * UDP_RETRY_EVERY):
        assert await hb.beat(1)
    tried = sum(len(link.sent) for link in links)
    assert tried == 2 + 2  # the first two, then every UDP_RETRY_EVERY-th
    assert hb.beats == {"http": 2 + 2 * UDP_RETRY_EVERY}


async def test_the_heartbeat_loop_beats_on_a_fixed_rate_only_while_registered() -> None:
    hb, s, _ = beater([], udp_target=None, interval=0.05)
    loop = asyncio.create_task(hb.run())
    try:
        await asyncio.sleep(0.12)
        assert s.posts == []  # no session yet
        s.registered.set()
        await until(lambda: _true(len(s.posts) >= 3), 5, "three heartbeats")
    finally:
        loop.cancel()


async def test_udp_beacon_against_a_real_listener_and_a_closed_port() -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client import Counter as PromCounter

    from scheduler.liveness import HeartbeatListener
    from scheduler.store import MemoryStore

    store = MemoryStore()
    await store.register(REG)
    counts = PromCounter("beats", "", ["transport", "result"], registry=CollectorRegistry())
    listener = HeartbeatListener(store, "127.0.0.1:0", b"k" * 32, counts)
    await listener.start()
    serving = asyncio.create_task(listener.run())
    beacon = UdpBeacon(b"k" * 32)
    try:
        target = ("127.0.0.1", listener.port)
        assert await beacon.beat(target, "me", Heartbeat(), 2.0) == datagram.ACK_OK
        assert await beacon.beat(target, "stranger", Heartbeat(), 2.0) == datagram.ACK_UNKNOWN
        # Nothing listens on the port: the ICMP error ends the wait at once, not after 5 s.
        started = time.monotonic()
        assert await beacon.beat(("127.0.0.1", free_port()), "me", Heartbeat(), 5.0) is None
        assert time.monotonic() - started < 1.0 and beacon.misses == 1
    finally:
        beacon.close()
        listener.stop()
        await serving


# --- outbox -----------------------------------------------------------------------------

class StateSession:
    """An outbox's session backed by the scheduler's real rules (a `ClusterState`)."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.connected = asyncio.Event()
        self.connected.set()
        self.sent: list[tuple[str, BaseModel | None]] = []
        self.fail: Exception | None = None

    async def post(self, path: str, body: BaseModel | None, reply: type | None,
                   seconds: float = 5.0, session: int | None = None) -> object:
        self.sent.append((path, body))
        if self.fail is not None:
            raise self.fail
        now = time.monotonic()
        if path == "/api/v1/announce":
            assert isinstance(body, Announce)
            return self.state.announce(body, now)
        if path == "/api/v1/withdraw":
            assert isinstance(body, Withdraw)
            self.state.withdraw(body)
        return None


def cluster_state() -> ClusterState:
    state = ClusterState(lease_timeout=30.0)
    for pid in ("me", "holder"):
        state.register(PeerRegistration(id=pid, upload_addr="127.0.0.1:9"), time.monotonic())
    for task in (TASK, OTHER):
        state.ensure_task(TaskRequest(task_id=task, length=8 * MiB, piece_size=MiB), 0.0)
    return state


def lease(state: ClusterState, peer: str, piece: int) -> None:
    (d,) = state.schedule(ScheduleRequest(peer_id=peer, task_id=TASK, pieces=[piece]),
                          time.monotonic())
    assert d.action == "source"


@pytest.fixture
async def outbox(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Outbox, StateSession]]:
    session = StateSession(cluster_state())
    waits = getattr(request, "param", (0.02, 0.04, 0.08))
    box = Outbox("me", session, defer_waits=waits)
    loop = asyncio.create_task(box.run())
    yield box, session
    loop.cancel()


async def test_a_piece_fetched_under_anothers_live_lease_ends_up_held(
        outbox: tuple[Outbox, StateSession]) -> None:
    box, session = outbox
    lease(session.state, "holder", 0)
    box.announce(TASK, 0, chunk(0))  # fetched on the on-demand path
    box.announce(TASK, 1, chunk(1))
    await until(lambda: _true(len(session.sent) >= 1), 5, "the first announcement")
    pieces = session.state.tasks[TASK].pieces
    assert pieces[1].holders == {"me"} and pieces[0].holders == set()  # 0 deferred
    assert not session.state.peers["me"].penalised(time.monotonic())
    # The lease resolves: its holder announces the same bytes.
    session.state.announce(Announce(peer_id="holder", task_id=TASK, pieces=[
        PieceClaim(index=0, chunk=chunk(0))]), time.monotonic())
    await until(lambda: _true("me" in pieces[0].holders), 5, "the deferred claim recorded")
    claims = [[c.index for c in body.pieces] for path, body in session.sent
              if isinstance(body, Announce)]
    assert claims[0] == [0, 1] and [0] in claims[1:]


@pytest.mark.parametrize("outbox", [(0.5, 0.5)], indirect=True)
async def test_a_deferred_claim_withdrawn_meanwhile_is_not_announced_again(
        outbox: tuple[Outbox, StateSession]) -> None:
    box, session = outbox
    lease(session.state, "holder", 0)
    box.announce(TASK, 0, chunk(0))
    await until(lambda: _true(len(session.sent) == 1), 5, "the announcement")
    box.withdraw(TASK, [0])  # before the first retry is due
    await until(lambda: _true(len(session.sent) == 2), 5, "the withdrawal")
    await asyncio.sleep(1.2)  # past every retry wait
    assert [p for p, _ in session.sent] == ["/api/v1/announce", "/api/v1/withdraw"]


async def test_deferred_claims_are_given_up_after_the_last_wait(
        outbox: tuple[Outbox, StateSession]) -> None:
    box, session = outbox
    lease(session.state, "holder", 0)  # and it never resolves
    box.announce(TASK, 0, chunk(0))
    await until(lambda: _true(len(session.sent) == 4), 5, "three retries")
    await asyncio.sleep(0.3)
    assert len(session.sent) == 4 and session.state.tasks[TASK].pieces[0].holders == set()


async def test_the_outbox_sends_drops_before_gains_and_keeps_what_could_not_be_sent(
        outbox: tuple[Outbox, StateSession]) -> None:
    box, session = outbox
    session.connected.clear()
    box.announce(TASK, 2, chunk(2))
    box.withdraw(TASK, [2])
    box.announce(TASK, 2, chunk(2))  # dropped, then fetched again: held
    box.sealed(OTHER)
    session.fail = SchedulerUnavailable("down")
    session.connected.set()
    await until(lambda: _true(len(session.sent) >= 1), 5, "a first try")
    session.fail = None
    pieces = session.state.tasks[TASK].pieces
    await until(lambda: _true(2 in pieces and "me" in pieces[2].holders), 10,
                "sent again once the scheduler answers")
    paths = [p for p, b in session.sent if getattr(b, "task_id", None) == TASK]
    assert paths[-2:] == ["/api/v1/withdraw", "/api/v1/announce"]


# --- re-announce --------------------------------------------------------------------------

class FakeStore:
    def __init__(self, tasks: list[StoredTask]) -> None:
        self._tasks = tasks
        self.dropped: list[str] = []

    def tasks(self) -> list[StoredTask]:
        return self._tasks

    def drop_task(self, task_id: str) -> None:
        self.dropped.append(task_id)


async def test_reannounce_tells_every_task_and_hands_deferred_claims_on() -> None:
    third = "sha256:" + "c" * 64
    store = FakeStore([
        StoredTask(TaskMeta(task_id=TASK, length=8 * MiB, piece_size=MiB, sealed=True),
                   {0: chunk(0), 1: chunk(1)}),
        StoredTask(TaskMeta(task_id=OTHER, length=8 * MiB, piece_size=MiB), {0: chunk(9)}),
        StoredTask(TaskMeta(task_id=third, length=8 * MiB, piece_size=MiB), {0: chunk(3)}),
    ])
    sent: list[tuple[str, BaseModel | None]] = []

    class Session:
        connected = asyncio.Event()

        async def post(self, path: str, body: BaseModel | None, reply: type | None,
                       seconds: float = 5.0, session: int | None = None) -> object:
            sent.append((path, body))
            if path == "/api/v1/tasks":
                assert isinstance(body, TaskRequest)
                if body.task_id == third:
                    raise SchedulerRefused(409, "length differs")
                size = 2 * MiB if body.task_id == OTHER else MiB  # OTHER's layout differs
                return TaskMeta(task_id=body.task_id, length=body.length, piece_size=size)
            return AnnounceReply(accepted=1, deferred=[1])

    handed: list[tuple[str, list[int]]] = []

    class Deferrals:
        def deferred(self, task_id: str, reply: AnnounceReply, ann: Announce,
                     attempt: int = 0) -> None:
            handed.append((task_id, reply.deferred))

    await reannounce("me", store, Session(), {TASK: "https://r.example"}, Deferrals())
    announces = [b for p, b in sent if p == "/api/v1/announce"]
    assert len(announces) == 1 and isinstance(announces[0], Announce)
    assert announces[0].sealed and announces[0].registry == "https://r.example"
    assert [c.index for c in announces[0].pieces] == [0, 1]
    assert store.dropped == [OTHER] and handed == [(TASK, [1])]


# --- live: a garbage first URL ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["html", "wrong-shape", "truncated", "empty",
                                  "registers-then-html"])
async def test_a_garbage_scheduler_url_is_failed_over_and_pulls_go_peer_to_peer(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        mode: str) -> None:
    blob = os.urandom(4 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    async with Garbage(mode) as garbage:
        a, b = await asyncio.gather(*(
            cluster.peer(name, garbage.url, origin.url, "--scheduler", sched.url,
                         wait_registered=False) for name in ("a", "b")))
        await asyncio.gather(wait_registered_peer(sched.url, "a"),
                             wait_registered_peer(sched.url, "b"))
        assert garbage.requests, "the garbage URL was never asked"
        status, headers, body = await fetch(f"{a.url}/v2/{repo}/blobs/{digest}")
        assert status == 200 and body == blob

        async def a_holds_all() -> bool:
            async with member_session() as s, \
                    s.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
                return r.status == 200 and all(
                    p["holders"] == ["a"] for p in (await r.json())["piece_map"])
        await until(a_holds_all, 10, "a's pieces announced to the real scheduler")
        before = origin.bytes_down
        status, headers, body = await fetch(f"{b.url}/v2/{repo}/blobs/{digest}")
        assert status == 200 and body == blob
        assert headers["X-Naiad-Source"] == "peer"
        assert origin.bytes_down - before < 64 * 1024  # the registry's HEAD, not the blob
    for peer in (a, b):
        logs = peer.proc.logs()
        assert "Traceback" not in logs and "loop scheduler-session failed" not in logs
        assert f"scheduler {garbage.url}" in logs  # one plain line says why it was skipped
