"""Seals are local facts; provisional chunk ids are bound to the registry that gave them.

Each test runs an attack of issue 11 against a real scheduler, real peers and a real registry,
and checks the bytes a client gets: the exact blob, or a connection cut short, never a
complete wrong body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from common import ids
from common.pieces import PieceLayout
from tests.cluster import (
    Cluster,
    CountingProxy,
    Node,
    Registry,
    free_port,
    member_session,
    push_blob,
    serve,
    until,
)
from tests.faults import FakePeer

MiB = 1 << 20
API = "/api/v1"


class ForgingPeer(FakePeer):
    """A member of the cluster (it holds the secret) that registers, serves chunks of its own
    choosing from an upload server of its own, and announces them as a sealed map."""

    def __init__(self, scheduler: str, peer_id: str, evil: bytes) -> None:
        super().__init__(scheduler, peer_id, free_port())
        self.evil = evil
        self.chunks: dict[str, bytes] = {}
        self.requests = 0

    async def _chunk(self, request: web.Request) -> web.Response:
        self.requests += 1
        data = self.chunks.get(request.match_info["chunk"])
        return web.Response(body=data) if data is not None else web.Response(status=404)

    async def __aenter__(self) -> ForgingPeer:
        app = web.Application()
        app.router.add_get("/chunks/{chunk}", self._chunk)
        self.runner = await serve(app, self.port)
        await super().__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        await self.runner.cleanup()

    async def forge(self, digest: str, registry: str, *, lease: bool = True) -> dict:
        """Create the task, take the lease over every piece, announce its own bytes' chunk
        ids as the blob, sealed."""
        meta = await self.post("/tasks", {"task_id": digest, "length": len(self.evil)})
        layout = PieceLayout(len(self.evil), meta["piece_size"])
        claims = []
        for i in range(layout.count):
            start, size = layout.span(i)
            piece = self.evil[start:start + size]
            self.chunks[ids.chunk_id(piece)] = piece
            claims.append({"index": i, "chunk": ids.chunk_id(piece)})
        if lease:
            reply = await self.post("/schedule", {"peer_id": self.id, "task_id": digest,
                                                  "pieces": list(range(layout.count)),
                                                  "registry": registry})
            assert {d["action"] for d in reply["decisions"]} == {"source"}
        return await self.post("/announce", {"peer_id": self.id, "task_id": digest,
                                             "pieces": claims, "sealed": True,
                                             "registry": registry})


class LyingRegistry:
    """An allow-listed registry front that answers 200 to any blob HEAD, with the real length
    plus `delta`, and serves `evil` bytes for every blob GET (ranges honoured)."""

    def __init__(self, evil: bytes, length: int) -> None:
        self.evil = evil
        self.length = length
        self.port = free_port()
        self.gets = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        headers = {"Docker-Content-Digest": request.match_info["digest"],
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            headers["Content-Length"] = str(self.length)
            return web.Response(status=200, headers=headers)
        self.gets += 1
        start, end, status = 0, self.length - 1, 200
        spec = request.headers.get("Range", "")
        if spec.startswith("bytes="):
            lo, _, hi = spec[6:].partition("-")
            start, end, status = int(lo), min(int(hi or end), end), 206
            headers["Content-Range"] = f"bytes {start}-{end}/{self.length}"
        return web.Response(status=status, body=self.evil[start:end + 1], headers=headers)

    @staticmethod
    async def _ping(_: web.Request) -> web.Response:
        return web.json_response({})

    async def __aenter__(self) -> LyingRegistry:
        app = web.Application()
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/", self._ping)
        self.runner = await serve(app, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def attempt(url: str, headers: dict[str, str] | None = None) -> bytes | None:
    """A GET's body, or None when the peer cut the connection short (what it must do rather
    than finish a wrong body)."""
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(url, headers=headers or {}) as r:
                assert r.status in (200, 206), await r.text()
                return await r.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            return None


async def exact(url: str, want: bytes, headers: dict[str, str] | None = None) -> None:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        assert r.status in (200, 206), await r.text()
        assert await r.read() == want


async def view(scheduler: str, path: str) -> dict:
    async with member_session() as s, s.get(f"{scheduler}{API}{path}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.fixture
async def blob(registry: Registry, repo: str) -> AsyncIterator[tuple[bytes, str]]:
    data = os.urandom(3 * MiB + 17)
    yield data, await push_blob(registry.url, repo, data)


async def two_peers(cluster: Cluster, origin: CountingProxy) -> tuple[Node, Node, Node]:
    sched = await cluster.scheduler()
    a, b = await asyncio.gather(cluster.peer("a", sched.url, origin.url),
                                cluster.peer("b", sched.url, origin.url))
    return sched, a, b


async def _reset_and_flagged(sched: Node, digest: str, attacker: str) -> bool:
    task = await view(sched.url, f"/tasks/{digest}")
    peer = await view(sched.url, f"/peers/{attacker}")
    return not task["sealed"] and all(p["holders"] != [attacker] for p in task["piece_map"]) \
        and peer["penalised"] and peer["penalty_reason"] == "mismatch"


async def test_a_forged_seal_serves_no_wrong_byte(
        cluster: Cluster, origin: CountingProxy, repo: str, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    sched, a, b = await two_peers(cluster, origin)
    url = f"{a.url}/v2/{repo}/blobs/{digest}"
    async with ForgingPeer(sched.url, "mallory", os.urandom(len(data))) as mallory:
        reply = await mallory.forge(digest, origin.url)
        assert reply["rejected"] == []  # recorded as a provisional map: the attack is live
        assert (await view(sched.url, f"/tasks/{digest}"))["sealed"] is False

        body = await attempt(url)
        assert body is None or body == data
        assert mallory.requests >= 1, "the forged map was never used"
        # The peer hashed the blob itself, found the mismatch and reported it: the map is
        # reset and its author flagged.
        await until(lambda: _reset_and_flagged(sched, digest, "mallory"),
                    what="the forged map reset and mallory flagged")
        await exact(url, data)
        await exact(f"{b.url}/v2/{repo}/blobs/{digest}", data[100:2 * MiB + 1],
                    {"Range": f"bytes=100-{2 * MiB}"})


async def test_a_seal_confirmed_by_colluders_is_still_checked(
        cluster: Cluster, origin: CountingProxy, repo: str, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    sched, a, b = await two_peers(cluster, origin)
    url = f"{a.url}/v2/{repo}/blobs/{digest}"
    evil = os.urandom(len(data))
    async with ForgingPeer(sched.url, "mallory", evil) as mallory, \
            ForgingPeer(sched.url, "trudy", evil) as trudy:
        await mallory.forge(digest, origin.url)
        await trudy.forge(digest, origin.url, lease=False)
        # Two members confirming each other do seal the map at the scheduler; a peer takes
        # that as advice only and hashes the blob all the same.
        assert (await view(sched.url, f"/tasks/{digest}"))["sealed"] is True
        body = await attempt(url)
        assert body is None or body == data
        assert mallory.requests + trudy.requests >= 1
        await until(lambda: _reset_and_flagged(sched, digest, "mallory"),
                    what="the sealed forged map reset")
        await exact(url, data)
        await exact(f"{b.url}/v2/{repo}/blobs/{digest}", data)


async def test_another_registrys_chunk_ids_never_reach_a_client_of_the_real_one(
        cluster: Cluster, origin: CountingProxy, repo: str, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    sched = await cluster.scheduler()
    evil = os.urandom(len(data))
    async with LyingRegistry(evil, len(data)) as liar:
        misled, victim = await asyncio.gather(
            cluster.peer("misled", sched.url, origin.url, "--no-prefetch",
                         "--allow-registry", f"http://{liar.host}"),
            cluster.peer("victim", sched.url, origin.url))
        # A client of the lying registry reads a range: the misled peer fetches it from there
        # under the lease, and its chunk ids become the task's provisional map.
        span = {"Range": f"bytes=0-{2 * MiB - 1}"}
        through_liar = {**span, "X-Dragonfly-Registry": liar.host}
        await exact(f"{misled.url}/v2/{repo}/blobs/{digest}", evil[:2 * MiB], through_liar)

        async def provisional() -> bool:
            task = await view(sched.url, f"/tasks/{digest}")
            return [p["holders"] for p in task["piece_map"]][:2] == [["misled"], ["misled"]]
        await until(provisional, what="the lying registry's chunk ids in the map")

        for peer in (victim, misled):  # another peer, and the misled one itself
            peer_url = f"{peer.url}/v2/{repo}/blobs/{digest}"
            await exact(peer_url, data[:2 * MiB], span)
            await exact(peer_url, data[MiB + 5:3 * MiB], {"Range": f"bytes={MiB + 5}-"
                                                                   f"{3 * MiB - 1}"})
            await exact(peer_url, data)


async def test_a_length_disagreement_never_drops_a_verified_copy(
        cluster: Cluster, origin: CountingProxy, repo: str, blob: tuple[bytes, str]) -> None:
    data, digest = blob
    sched = await cluster.scheduler()
    async with LyingRegistry(os.urandom(len(data) + 1), len(data) + 1) as liar:
        allow = ("--allow-registry", f"http://{liar.host}")
        p, q = await asyncio.gather(
            cluster.peer("p", sched.url, origin.url, *allow),
            cluster.peer("q", sched.url, origin.url, "--no-prefetch", *allow))
        p_url, q_url = (f"{n.url}/v2/{repo}/blobs/{digest}" for n in (p, q))
        await exact(p_url, data)  # assembled and verified on p
        await exact(q_url, data[:MiB], {"Range": f"bytes=0-{MiB - 1}"})  # unverified on q

        async def holds(peer: str) -> bool:
            task = await view(sched.url, f"/tasks/{digest}")
            return any(peer in piece["holders"] for piece in task["piece_map"])

        async def q_withdrawn() -> bool:
            return not await holds("q")
        await until(lambda: holds("q"), what="q's range announced")

        async with aiohttp.ClientSession() as s, \
                s.get(p_url, headers={"X-Dragonfly-Registry": liar.host}) as r:
            assert r.status == 502, await r.text()
            assert r.headers["X-Dragonfly-Error-Type"] == "proxy"
        assert liar.gets == 0
        async with aiohttp.ClientSession() as s, s.get(p_url) as r:
            assert r.status == 200 and await r.read() == data
            assert r.headers["X-Naiad-Source"] == "local"
        assert await holds("p")

        # q's copy was never verified: dropped, and withdrawn so nobody is sent to it.
        await attempt(q_url, {"X-Dragonfly-Registry": liar.host,
                              "Range": f"bytes=0-{MiB - 1}"})
        await until(q_withdrawn, what="q's dropped copy withdrawn")
        await exact(q_url, data[:MiB], {"Range": f"bytes=0-{MiB - 1}"})

