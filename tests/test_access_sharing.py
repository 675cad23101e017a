"""Registry access answers shared cluster-wide (scheduler/access.py, issue 14):

- the rules on both books (one process, and a real redis-server): one claim per key, waiters
  woken by the answer, a refusal hides a yes, disagreeing yeses are dropped, a 5xx is not
  shared, nothing lives longer than 60 s, claims lapse;
- the scheduler's routes: signed only, refused without a cluster secret;
- real peer processes against a real registry behind a request counter: N peers pulling one
  layer anonymously or with one shared credential cost the registry one HEAD, a client without
  the credential is refused exactly as the registry refuses it, the repository is part of the
  answer, a scheduler that is down sends each peer to the registry;
- a revoked credential is refused within the peers' access TTL (real scheduler, real
  SchedulerClients, a registry that revokes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from bench.registry_load import RegistryCounter, pull_all
from common.models import (
    ACCESS_TTL_MS,
    AccessAnswer,
    AccessQuery,
    Heartbeat,
    PeerRegistration,
)
from peer.mirror import AccessCache
from peer.origin import OriginClient, OriginRequest
from peer.scheduler_client import SchedulerClient
from peer.store import ChunkStore
from scheduler.access import AccessService, Answer, MemoryBook, RedisBook, kind, shared
from scheduler.api import SchedulerAPI
from scheduler.store import MemoryStore
from tests.cluster import (
    Cluster,
    Registry,
    fetch,
    free_port,
    member_secret,
    member_session,
    push_blob,
    serve,
    until,
)
from tests.redis_servers import RedisCluster, RedisServer
from tests.registry_auth import TokenServer

MiB = 1 << 20
KEY = "ab" * 32


# -- the rules ---------------------------------------------------------------------------------

def test_what_an_answer_is_worth_to_others() -> None:
    assert kind(200, 10) == "yes" and kind(206, 10) == "yes"
    assert kind(200, None) is None  # a yes without a length: nothing to serve by
    assert kind(401, None) == "no" and kind(403, None) == "no" and kind(404, None) == "no"
    assert kind(502, None) is None and kind(307, None) is None
    yes, no = Answer(200, 5, 10.0), Answer(401, None, 10.0)
    assert shared(no, yes) is no and shared(None, yes) is yes and shared(None, None) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-access"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster-access"))
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def book(request: pytest.FixtureRequest) -> AsyncIterator[MemoryBook | RedisBook]:
    if request.param == "memory":
        yield MemoryBook()
        return
    client: aioredis.Redis | aioredis.RedisCluster
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_proc")
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        await client.flushall()
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        await cluster.flush()
        client = aioredis.RedisCluster.from_url(cluster.url, decode_responses=True)
    yield RedisBook(client)
    await client.aclose()


def q(peer: str, wait_ms: int = 0, key: str = KEY) -> AccessQuery:
    return AccessQuery(peer_id=peer, key=key, wait_ms=wait_ms)


def a(peer: str, status: int, length: int | None = None, ttl_ms: int = 60_000,
      key: str = KEY) -> AccessAnswer:
    return AccessAnswer(peer_id=peer, key=key, status=status, length=length, ttl_ms=ttl_ms)


async def test_one_claim_per_key_and_waiters_get_the_answer(book: MemoryBook | RedisBook
                                                            ) -> None:
    svc = AccessService(book)
    assert (await svc.lookup(q("p1"))).claimed
    assert (await svc.lookup(q("p1"))).claimed  # its own claim still
    other = await svc.lookup(q("p2"))
    assert not other.claimed and other.status is None  # no wait: asks for itself
    assert not (await svc.lookup(q("p1", key="cd" * 32))).status  # keys are independent
    waiting = [asyncio.create_task(svc.lookup(q(f"w{i}", wait_ms=3000))) for i in range(5)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in waiting)
    started = time.monotonic()
    await svc.publish(a("p1", 200, 1234, ttl_ms=30_000))
    replies = await asyncio.gather(*waiting)
    assert time.monotonic() - started < 0.5  # woken (or polled), not timed out
    assert all(r.status == 200 and r.length == 1234 and 29_000 < r.ttl_ms <= 30_000
               and not r.claimed for r in replies)
    assert svc.counts["claimed"] == 3 and svc.counts["shared"] == 5


async def test_a_refusal_hides_a_yes_and_a_yes_never_hides_a_refusal(
        book: MemoryBook | RedisBook) -> None:
    svc = AccessService(book)
    await svc.publish(a("p1", 200, 10))
    await svc.publish(a("p2", 401))
    got = await svc.lookup(q("p3"))
    assert got.status == 401 and got.length is None
    await svc.publish(a("p4", 200, 10))  # kept, but the live refusal still wins
    assert (await svc.lookup(q("p5"))).status == 401


async def test_yeses_that_disagree_on_the_length_are_not_shared(
        book: MemoryBook | RedisBook) -> None:
    svc = AccessService(book)
    await svc.publish(a("p1", 200, 10))
    await svc.publish(a("p2", 200, 11))
    got = await svc.lookup(q("p3"))
    assert got.status is None and got.claimed  # p3 asks the registry itself


async def test_a_failure_is_not_shared_and_gives_the_claim_back(
        book: MemoryBook | RedisBook) -> None:
    svc = AccessService(book)
    assert (await svc.lookup(q("p1"))).claimed
    waiter = asyncio.create_task(svc.lookup(q("p2", wait_ms=3000)))
    await asyncio.sleep(0.05)
    await svc.publish(a("p1", 502))
    got = await waiter
    assert got.status is None and got.claimed  # the next asker, at once
    await svc.publish(a("p2", 200, None))  # a 2xx without a length: nothing
    assert (await svc.lookup(q("p3"))).claimed


async def test_a_claim_by_another_is_not_given_back_by_a_stranger(
        book: MemoryBook | RedisBook) -> None:
    svc = AccessService(book)
    assert (await svc.lookup(q("p1"))).claimed
    await svc.publish(a("p2", 502))
    assert not (await svc.lookup(q("p3"))).claimed


async def test_answers_live_no_longer_than_they_were_trusted() -> None:
    clock = Clock()
    svc = AccessService(MemoryBook(clock))
    await svc.publish(a("p1", 200, 10, ttl_ms=ACCESS_TTL_MS))
    assert (await svc.lookup(q("p2"))).ttl_ms == ACCESS_TTL_MS
    clock.now += 59.9
    assert (await svc.lookup(q("p2"))).status == 200
    clock.now += 0.2
    assert (await svc.lookup(q("p2"))).claimed  # gone: p2 asks the registry
    clock.now += 4.9
    assert not (await svc.lookup(q("p3"))).claimed
    clock.now += 0.2  # p2 never answered: its claim lapsed
    assert (await svc.lookup(q("p3"))).claimed
    with pytest.raises(ValueError):  # no peer may ask for longer
        a("p1", 200, 10, ttl_ms=ACCESS_TTL_MS + 1)


async def test_redis_keys_expire_by_redis_and_share_one_slot(redis_proc: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_proc.url, decode_responses=True)
    try:
        await client.flushall()
        svc = AccessService(RedisBook(client))
        await svc.lookup(q("p1"))
        await svc.publish(a("p1", 200, 10, ttl_ms=300))
        names = sorted(await client.keys("naiad:access:*"))
        assert names == [f"naiad:access:{{{KEY}}}:yes"]  # the claim given back
        assert 0 < await client.pttl(names[0]) <= 300
        assert KEY in names[0] and "sha256" not in names[0]
        await until(lambda: _gone(client, names[0]), 5, "the answer expired")
        assert (await svc.lookup(q("p2"))).claimed
    finally:
        await client.aclose()


async def _gone(client: aioredis.Redis, name: str) -> bool:
    return not await client.exists(name)


def test_the_memory_book_is_bounded() -> None:
    clock = Clock()
    book = MemoryBook(clock, capacity=3)

    async def fill() -> None:
        for i in range(10):
            await book.put(f"{i:064x}", "yes", Answer(200, 1, 10.0))

    asyncio.run(fill())
    assert len(book._items) <= 3


# -- the routes --------------------------------------------------------------------------------

async def test_the_routes_are_signed_and_need_a_secret() -> None:
    secret = b"s" * 32
    port = free_port()
    runner = await serve(SchedulerAPI(MemoryStore(), scheduler_id="x", secret=secret).app(),
                         port)
    open_port = free_port()
    open_runner = await serve(SchedulerAPI(MemoryStore(), scheduler_id="y").app(), open_port)
    body = q("p1").model_dump_json().encode()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/api/v1/access", data=body) as r:
                assert r.status == 401
            async with s.post(f"http://127.0.0.1:{open_port}/api/v1/access", data=body) as r:
                assert r.status == 403  # no secret: anyone could publish a yes
        async with member_session(secret) as s:
            async with s.post(f"http://127.0.0.1:{port}/api/v1/access", data=body) as r:
                assert r.status == 200 and (await r.json())["claimed"] is True
            async with s.post(f"http://127.0.0.1:{port}/api/v1/access/answers",
                              data=a("p1", 200, 5).model_dump_json().replace(
                                  "60000", "70000")) as r:
                assert r.status == 400  # longer than any answer may live
    finally:
        await runner.cleanup()
        await open_runner.cleanup()


# -- real peers, real registries ---------------------------------------------------------------

def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _peers(cluster: Cluster, n: int, registry: str) -> list[str]:
    sched = await cluster.scheduler()
    nodes = await asyncio.gather(*(cluster.peer(f"peer-{i}", sched.url, registry)
                                   for i in range(n)))
    return [node.url for node in nodes]


async def test_n_peers_pulling_anonymously_cost_the_registry_one_head(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    counter = RegistryCounter(registry.url)
    await counter.start()
    try:
        data = os.urandom(4 * MiB + 3)
        digest = await push_blob(registry.url, repo, data)
        peers = await _peers(cluster, 6, counter.url)
        got = await pull_all([f"{p}/v2/{repo}/blobs/{digest}" for p in peers])
        assert got == [(200, digest)] * 6
        assert counter.heads <= 2, counter.requests  # was one per peer (6)
        # Another repository's name is another question: the registry is asked (and refuses).
        status, _, _ = await fetch(f"{peers[0]}/v2/{repo}-other/blobs/{digest}")
        direct, _, _ = await fetch(f"{registry.url}/v2/{repo}-other/blobs/{digest}")
        assert status == direct == 404
    finally:
        await counter.stop()


@pytest.fixture
async def token_registry(tmp_path: Path) -> AsyncIterator[tuple[TokenServer, Registry]]:
    tokens = TokenServer(tmp_path, users={"ci": "ci-pass", "dev": "dev-pass"},
                         grants={"ci": {"team/*": ["pull", "push"]},
                                 "dev": {"team/other": ["pull"]}})
    await tokens.start()
    reg = Registry(tmp_path / "registry", tokens.registry_yaml())
    try:
        await reg.ready()
        yield tokens, reg
    finally:
        reg.stop()
        await tokens.stop()


async def test_a_shared_credential_costs_one_head_and_others_are_refused_as_by_the_registry(
        cluster: Cluster, token_registry: tuple[TokenServer, Registry]) -> None:
    tokens, reg = token_registry
    counter = RegistryCounter(reg.url)
    await counter.start()
    try:
        data = os.urandom(3 * MiB + 5)
        push = {"Authorization": "Bearer " + tokens.issue("ci", ["repository:team/app:pull,push"])}
        digest = await push_blob(reg.url, "team/app", data, push)
        pull = {"Authorization": "Bearer " + tokens.issue("ci", ["repository:team/app:pull"])}
        peers = await _peers(cluster, 5, counter.url)
        url = f"/v2/team/app/blobs/{digest}"
        assert await pull_all([p + url for p in peers], pull) == [(200, digest)] * 5
        assert counter.heads <= 2, counter.requests
        heads = counter.heads
        # Every peer holds the layer now; a client without the credential, or with another
        # repository's, is refused at each of them exactly as the registry refuses it.
        others = [None, "Bearer " + tokens.issue("dev", ["repository:team/app:pull"]),
                  "Bearer " + tokens.issue("dev", ["repository:team/other:pull"])]
        for auth in others:
            headers = {"Authorization": auth} if auth else {}
            for path in (url, f"/v2/team/other/blobs/{digest}"):
                direct = await fetch(reg.url + path, headers)
                for p in peers[-2:]:
                    status, got_headers, body = await fetch(p + path, headers)
                    assert (status, body) == (direct[0], direct[2]) and status in (401, 403, 404)
                    assert got_headers.get("WWW-Authenticate") == \
                        direct[1].get("WWW-Authenticate")
                    assert data[:64] not in body
        assert counter.heads > heads  # each of those was the registry's own question
    finally:
        await counter.stop()


class RevocableRegistry:
    """A registry front that knows its tokens and can revoke one: HEAD and GET of
    `/v2/<repo>/blobs/<digest>` for a token granted that repository; counts HEADs."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.grants: dict[str, set[str]] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.heads = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", self._blob)
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        repo, digest = request.match_info["repo"], request.match_info["digest"]
        self.heads += request.method == "HEAD"
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if repo not in self.grants.get(token, set()):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="x"'})
        data = self.blobs[digest]
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        return web.Response(body=data)


async def _client(url: str, name: str, session: aiohttp.ClientSession,
                  tmp: Path) -> SchedulerClient:
    store = ChunkStore(tmp / name)
    store.open()
    reg = PeerRegistration(id=name, upload_addr="127.0.0.1:9")
    client = SchedulerClient([url], reg, session, store, Heartbeat, member_secret())
    await client.start()
    await asyncio.wait_for(client.connected.wait(), 10)
    return client


async def test_a_revoked_credential_is_refused_within_the_access_ttl(
        cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(1000)
    digest = _digest(data)
    reg = RevocableRegistry({digest: data})
    reg.grants["tok"] = {"team/app"}
    await reg.start()
    sched = await cluster.scheduler()
    ttl = 1.5
    async with aiohttp.ClientSession() as session:
        clients = [await _client(sched.url, f"p{i}", session, tmp_path) for i in range(3)]
        origin = OriginClient(session)
        caches = [AccessCache(origin, ttl=ttl, shared=c, secret=member_secret())
                  for c in clients]
        req = OriginRequest(f"{reg.url}/v2/team/app/blobs/{digest}", reg.url, "Bearer tok")
        scope = f"team/app@{digest}"
        try:
            answers = await asyncio.gather(*(c.probe(req, scope) for c in caches))
            yes_at = time.monotonic()
            assert [p.status for p in answers] == [200] * 3 and reg.heads == 1
            assert sum(c.counts["shared"] for c in caches) == 2
            # Another repository for the same token: its own question, refused.
            other = OriginRequest(f"{reg.url}/v2/team/secret/blobs/{digest}", reg.url,
                                  "Bearer tok")
            assert (await caches[1].probe(other, f"team/secret@{digest}")).status == 401
            del reg.grants["tok"]  # revoked at the registry
            last_yes = yes_at
            while True:
                got = await asyncio.gather(*(c.probe(req, scope) for c in caches))
                now = time.monotonic()
                if any(p.status == 200 for p in got):
                    last_yes = now
                if all(p.status == 401 for p in got):
                    break
                assert now - yes_at < ttl + 2, "still readable long after the revocation"
                await asyncio.sleep(0.05)
            assert last_yes - yes_at <= ttl + 0.2  # the bound: the TTL of the registry's yes
        finally:
            for c in clients:
                await c.stop()
                c.store.close()
            await reg.stop()


async def test_a_scheduler_that_is_down_sends_each_peer_to_the_registry(tmp_path: Path
                                                                        ) -> None:
    data = os.urandom(100)
    digest = _digest(data)
    reg = RevocableRegistry({digest: data})
    reg.grants[""] = {"team/app"}  # anonymous
    await reg.start()
    async with aiohttp.ClientSession() as session:
        store = ChunkStore(tmp_path / "p")
        store.open()
        down = SchedulerClient([f"http://127.0.0.1:{free_port()}"],
                               PeerRegistration(id="p", upload_addr="127.0.0.1:9"), session,
                               store, Heartbeat, b"k" * 32)
        await down.start()
        try:
            caches = [AccessCache(OriginClient(session), shared=down, secret=b"k" * 32)
                      for _ in range(3)]
            req = OriginRequest(f"{reg.url}/v2/team/app/blobs/{digest}", reg.url)
            got = await asyncio.gather(*(c.probe(req, f"team/app@{digest}") for c in caches))
            assert [p.status for p in got] == [200] * 3 and reg.heads == 3
            assert all(c.counts == {"registry": 1, "shared": 0} for c in caches)
        finally:
            await down.stop()
            store.close()
            await reg.stop()
