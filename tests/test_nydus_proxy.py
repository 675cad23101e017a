"""Today's nydusd proxy mode (clients.md, DESIGN's mirror section): the peer's answers to
`X-Dragonfly-Prefetch`, `X-Dragonfly-Use-P2P` and its own failures marked
`X-Dragonfly-Error-Type: proxy` (429 rather than a long wait), against live peers and a real
registry; and the emulation's rules (tests/nydus.py) against small real fault servers."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest

from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    free_port,
    member_session,
    metric,
    push_blob,
    serve,
    until,
)
from tests.faults import FlakyRegistry, ScriptedProxy
from tests.nydus import Nydus, PrefetchAbandoned, ProxyError, ReadFailed

MiB = 1 << 20
MARK = "X-Dragonfly-Error-Type"


def nydus_headers(priority: int = 6, prefetch: str | None = None,
                  p2p: str = "true") -> dict[str, str]:
    h = {"X-Dragonfly-Priority": str(priority), "X-Dragonfly-Use-P2P": p2p,
         "User-Agent": "nydusd/1.0.0"}
    if prefetch is not None:
        h["X-Dragonfly-Prefetch"] = prefetch
    return h


async def holders(scheduler: str, digest: str, peer: str) -> tuple[int, int]:
    """(pieces `peer` holds, pieces of the task) in the scheduler's map."""
    async with member_session() as s, s.get(f"{scheduler}/api/v1/tasks/{digest}") as r:
        if r.status == 404:
            return 0, 0
        task = await r.json()
    return sum(peer in p["holders"] for p in task["piece_map"]), task["pieces"]


# -- the peer ------------------------------------------------------------------------------


async def test_prefetch_true_answers_the_range_then_fetches_the_rest_once(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    """A ranged read with `X-Dragonfly-Prefetch: true` on a cold blob behind a slow registry
    is answered when the registry has sent the piece it covers, then the peer fetches the rest
    in the background; eleven more such reads at once start nothing more: the peer holds it
    all and the registry sent the blob once."""
    blob = os.urandom(32 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    async with FlakyRegistry(registry.url, rate=8 * MiB) as slow:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, slow.url)
        url = f"{slow.url}/v2/{repo}/blobs/{digest}"  # proxy mode: the absolute-form target
        ranges = [(i * 2 * MiB + 12345, 200_000 + i) for i in range(12)]
        answered_at: list[int] = []

        async def ranged(s: aiohttp.ClientSession, off: int, n: int) -> None:
            h = {**nydus_headers(6, "true"), "Range": f"bytes={off}-{off + n - 1}"}
            async with s.get(url, headers=h, proxy=peer.url) as r:
                assert r.status == 206, await r.text()
                assert MARK not in r.headers
                assert await r.read() == blob[off:off + n]
            answered_at.append(slow.blob_bytes)

        async with aiohttp.ClientSession() as s:
            await ranged(s, *ranges[0])
            assert answered_at[0] <= 1 * MiB + 256 * 1024, \
                f"answered after {answered_at[0] / MiB:.1f} MiB of the registry"
            await asyncio.gather(*(ranged(s, off, n) for off, n in ranges[1:]))

        async def all_held() -> bool:
            held, pieces = await holders(sched.url, digest, "p")
            return pieces > 0 and held == pieces
        await until(all_held, 30, "the background fetch of the rest of the blob")
        async with aiohttp.ClientSession() as s, \
                s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
            assert r.headers["X-Naiad-Source"] == "local"
            assert await r.read() == blob
        assert slow.blob_bytes <= 1.02 * len(blob), \
            f"the registry sent {slow.blob_bytes / len(blob):.2f}x the blob"


async def test_prefetch_false_fetches_only_the_range(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """nydusd with prefetch off for its backend says `X-Dragonfly-Prefetch: false`: only the
    piece covering the range is fetched. Measured against a blob read beside it with `true`,
    whose background fetch has finished by then."""
    lazy, eager = os.urandom(16 * MiB), os.urandom(16 * MiB)
    d_lazy = await push_blob(registry.url, repo, lazy)
    d_eager = await push_blob(registry.url, repo, eager)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    before = origin.bytes_down
    async with aiohttp.ClientSession() as s:
        for digest, blob, flag in ((d_lazy, lazy, "false"), (d_eager, eager, "true")):
            h = {**nydus_headers(6, flag), "Range": "bytes=5000000-5099999"}
            async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}", headers=h) as r:
                assert r.status == 206
                assert await r.read() == blob[5000000:5100000]

    async def eager_held() -> bool:
        held, pieces = await holders(sched.url, d_eager, "p")
        return pieces > 0 and held == pieces
    await until(eager_held, 30, "the background fetch of the blob read with prefetch true")
    assert await holders(sched.url, d_lazy, "p") == (1, 16)
    sent = origin.bytes_down - before
    assert sent <= len(eager) + 1 * MiB + 128 * 1024, f"the registry sent {sent / MiB:.1f} MiB"


async def test_use_p2p_false_passes_the_request_to_the_registry(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """`X-Dragonfly-Use-P2P: false`: the registry's own answer (its headers, its 206), nothing
    kept, no task at the scheduler; still only to allow-listed registries."""
    blob = os.urandom(3 * MiB + 7)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    asked = 0

    async def unlisted_handler(_: aiohttp.web.Request) -> aiohttp.web.Response:
        nonlocal asked
        asked += 1
        return aiohttp.web.Response(text="should never be asked")
    unlisted = free_port()
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", unlisted_handler)
    runner = await serve(app, unlisted)
    try:
        async with aiohttp.ClientSession() as s:
            h = {**nydus_headers(6, "true", p2p="false"), "Range": "bytes=1000-2000999"}
            async with s.get(f"{origin.url}/v2/{repo}/blobs/{digest}", headers=h,
                             proxy=peer.url) as r:
                assert r.status == 206
                assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
                assert "X-Naiad-Task-Id" not in r.headers and MARK not in r.headers
                assert await r.read() == blob[1000:2001000]
            # Mirror mode, the registry named by header: the same, and so for a HEAD.
            h = {"X-Dragonfly-Use-P2P": "false", "X-Dragonfly-Registry": origin.url}
            async with s.head(f"{peer.url}/v2/{repo}/blobs/{digest}", headers=h) as r:
                assert r.status == 200 and r.headers["Content-Length"] == str(len(blob))
                assert "X-Naiad-Task-Id" not in r.headers
            # Never an open proxy.
            async with s.get(f"http://127.0.0.1:{unlisted}/v2/{repo}/blobs/{digest}",
                             headers={"X-Dragonfly-Use-P2P": "false"}, proxy=peer.url) as r:
                assert r.status == 403 and r.headers[MARK] == "proxy"
        assert asked == 0
    finally:
        await runner.cleanup()
    assert await metric(peer.url, "naiad_peer_served_bytes_total") == 0
    assert await holders(sched.url, digest, "p") == (0, 0)


class Opinionated(FlakyRegistry):
    """A registry front that answers HEAD and GET of some digests with a status of its own
    (as a registry would: a JSON error body), and relays everything else to the registry."""

    def __init__(self, registry_url: str, answers: dict[str, int]) -> None:
        super().__init__(registry_url)
        self.answers = answers

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        status = self.answers.get(request.path.rpartition("/")[2])
        if status is None:
            return await super()._handle(request)
        return aiohttp.web.json_response(
            {"errors": [{"code": f"REGISTRY_{status}", "message": "the registry says"}]},
            status=status, headers={429: {"Retry-After": "30"},
                                    401: {"WWW-Authenticate": 'Bearer realm="http://x/t"'}
                                    }.get(status, {}))


async def test_error_type_marks_the_peers_failures_never_the_registrys(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    """The registry's 401/403/404/429/5xx come back as the registry gave them, unmarked; what
    the peer itself fails at (an unlisted registry, a bad name, an unreachable registry, bytes
    it cannot get, a range past the end) is marked `X-Dragonfly-Error-Type: proxy`."""
    blob = os.urandom(2 * MiB + 1)
    digest = await push_blob(registry.url, repo, blob)
    never = await push_blob(registry.url, repo, os.urandom(MiB))  # only where GETs fail
    fake = {s: "sha256:" + f"{s:064x}" for s in (401, 403, 429, 500, 503)}
    unknown = "sha256:" + "e" * 64
    dead = f"http://127.0.0.1:{free_port()}"  # allow-listed, nothing listening
    async with Opinionated(registry.url, {d: s for s, d in fake.items()}) as front, \
            FlakyRegistry(registry.url, fail=1000) as failing:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, front.url, "--allow-registry", failing.url,
                                  "--allow-registry", dead)
        base = f"{front.url}/v2/{repo}/blobs"
        async with aiohttp.ClientSession() as s:
            async def ask(url: str, **h: str) -> tuple[int, dict, bytes]:
                headers = {**nydus_headers(6, "true"), "Range": "bytes=0-99", **h}
                async with s.get(url, headers=headers, proxy=peer.url) as r:
                    return r.status, dict(r.headers), await r.read()

            # The registry's answers, untouched.
            for status, d in fake.items():
                got, h, body = await ask(f"{base}/{d}")
                assert got == status and MARK not in h, (status, h)
                assert f"REGISTRY_{status}".encode() in body
                if status == 429:
                    assert h["Retry-After"] == "30"
                if status == 401:
                    assert h["WWW-Authenticate"] == 'Bearer realm="http://x/t"'
            got, h, body = await ask(f"{base}/{unknown}")
            assert (got, MARK in h) == (404, False) and b"BLOB_UNKNOWN" in body
            got, h, body = await ask(f"{base}/{digest}")  # and the real blob is served
            assert (got, body, MARK in h) == (206, blob[:100], False)

            # The peer's own.
            own = {
                "unlisted registry": (403, f"http://127.0.0.1:1/v2/{repo}/blobs/{digest}"),
                "bad digest": (400, f"{base}/sha256:nothex"),
                "registry unreachable": (502, f"{dead}/v2/{repo}/blobs/{digest}"),
                "no bytes to be had": (502, f"{failing.url}/v2/{repo}/blobs/{never}"),
            }
            for why, (status, url) in own.items():
                got, h, body = await ask(url)
                assert (got, h.get(MARK)) == (status, "proxy"), (why, got, h, body[:200])
            got, h, _ = await ask(f"{base}/{digest}", Range=f"bytes={len(blob)}-")
            assert (got, h.get(MARK)) == (416, "proxy")
        # Counted by status: the peer's own answers, none of the registry's.
        for status, n in ((403, 1), (400, 1), (502, 2), (416, 1), (401, 0), (500, 0)):
            try:
                counted = await metric(peer.url, "naiad_peer_proxy_errors_total",
                                       {"status": str(status)})
            except KeyError:  # never answered
                counted = 0
            assert counted == n, status
    assert failing.failed >= 1


async def test_on_demand_read_gets_429_when_origin_capacity_is_taken(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    """One origin connection (`--origin-concurrency 1`) held by a registry answer that hangs:
    an on-demand read of another blob answers 429 marked as the peer's within ~1 s (DESIGN's
    on-demand patience) instead of waiting; the emulated nydusd then reads it from the
    registry itself, and keeps doing so for a while."""
    hung, wanted = os.urandom(4 * MiB), os.urandom(4 * MiB + 5)
    d_hung = await push_blob(registry.url, repo, hung)
    d_wanted = await push_blob(registry.url, repo, wanted)
    async with FlakyRegistry(registry.url, stall=1) as flaky:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, flaky.url, "--origin-concurrency", "1",
                                  "--no-prefetch")
        async with aiohttp.ClientSession() as s:
            async def pull_hung() -> None:
                async with s.get(f"{peer.url}/v2/{repo}/blobs/{d_hung}") as r:
                    await r.read()
            holder = asyncio.create_task(pull_hung())

            async def stalled() -> bool:
                return flaky.stalled == 1
            await until(stalled, 10, "the registry to hang on the first blob")

            started = time.monotonic()
            h = {**nydus_headers(6, "true"), "Range": "bytes=100-200099"}
            async with s.get(f"{flaky.url}/v2/{repo}/blobs/{d_wanted}", headers=h,
                             proxy=peer.url) as r:
                status, marked, retry = (r.status, r.headers.get(MARK),
                                         r.headers.get("Retry-After"))
                assert wanted[:64] not in await r.read()
            elapsed = time.monotonic() - started
            assert (status, marked, retry) == (429, "proxy", "1")
            assert 0.9 < elapsed < 3.0, f"429 after {elapsed:.2f} s"
            assert await metric(peer.url, "naiad_peer_proxy_errors_total",
                                {"status": "429"}) == 1

            client = Nydus(flaky.url, repo, d_wanted, len(wanted), proxy=peer.url)
            assert await client.read(s, 100, 200_000) == wanted[100:200_100]
            assert (client.limited, client.direct, client.via_proxy) == (1, 1, 1)
            # For a while, on-demand reads go straight to the registry.
            assert await client.read(s, 3 * MiB, 300_000) == wanted[3 * MiB:3 * MiB + 300_000]
            assert (client.direct, client.via_proxy) == (2, 1)
            holder.cancel()


async def test_stream_prefetch_reads_the_whole_blob_without_range(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """nydusd's stream_prefetch: one GET with no Range (200, the whole blob) and `bytes=N-`;
    every byte checked, the registry sending the blob once."""
    blob = os.urandom(20 * MiB + 333)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    async with ScriptedProxy() as recorder, aiohttp.ClientSession() as s:
        seen = Nydus(origin.url, repo, digest, len(blob), proxy=recorder.url)
        assert await seen.stream(s) == blob
        assert "Range" not in recorder.requests[0]
        assert recorder.requests[0]["X-Dragonfly-Priority"] == "3"
        before = origin.bytes_down
        client = Nydus(origin.url, repo, digest, len(blob), proxy=peer.url)
        assert await client.stream(s) == blob
        assert await client.stream(s, 7 * MiB + 1) == blob[7 * MiB + 1:]
        assert (client.fallbacks, client.direct) == (0, 0)
    assert origin.bytes_down - before <= 1.02 * len(blob)
    assert await metric(peer.url, "naiad_peer_served_bytes_total") == 2 * len(blob) - 7 * MiB - 1


# -- the emulation's rules, against small real fault servers -------------------------------


@pytest.fixture
async def small_blob(registry: Registry, origin: CountingProxy,
                     repo: str) -> tuple[bytes, str]:
    blob = os.urandom(1 * MiB + 17)
    return blob, await push_blob(registry.url, repo, blob)


@pytest.mark.parametrize(("script", "kind", "outcome"), [
    # 429 marked on demand: straight to the registry (and for a while after).
    ([(429, True)], "on-demand", "direct"),
    # 429 marked on a prefetch: given up, nothing sent anywhere else.
    ([(429, True)], "prefetch", "abandoned"),
    # 403 marked: no retry at all.
    ([(403, True)], "on-demand", "refused"),
    ([(403, True)], "prefetch", "refused"),
    # >= 500, marked or not, with fallback: the same request straight to the registry.
    ([(502, True)], "on-demand", "fallback"),
    ([(503, False)], "prefetch", "fallback"),
    # < 500 unmarked is the caller's answer: retried through the proxy, never a fallback; on
    # demand the last retry goes straight to the registry.
    ([(404, False)] * 3, "on-demand", "last-direct"),
    # Another marked status: an error, retried through the proxy.
    ([(400, True)], "on-demand", "retried"),
])
async def test_nydusd_proxy_rules(script: list[tuple[int, bool]], kind: str, outcome: str,
                                  small_blob: tuple[bytes, str], origin: CountingProxy,
                                  repo: str) -> None:
    blob, digest = small_blob
    async with ScriptedProxy(script) as proxy, aiohttp.ClientSession() as s:
        client = Nydus(origin.url, repo, digest, len(blob), proxy=proxy.url)
        off, n = 4000, 300_000
        before = origin.bytes_down
        if outcome in ("abandoned", "refused"):
            with pytest.raises(PrefetchAbandoned if outcome == "abandoned" else ProxyError):
                await client.read(s, off, n, kind)
            assert len(proxy.requests) == 1, "retried"
            assert origin.bytes_down == before, "went to the registry"
            assert (client.direct, client.fallbacks) == (0, 0)
            return
        assert await client.read(s, off, n, kind) == blob[off:off + n]
        assert proxy.requests[0]["X-Dragonfly-Use-P2P"] == "true"
        assert proxy.requests[0]["X-Dragonfly-Prefetch"] == "true"
        assert proxy.requests[0]["X-Dragonfly-Priority"] == ("3" if kind == "prefetch" else "6")
        expected = {"direct": (1, 1, 0), "fallback": (1, 0, 1), "last-direct": (3, 1, 0),
                    "retried": (2, 0, 0)}[outcome]
        assert (len(proxy.requests), client.direct, client.fallbacks) == expected
        if outcome == "direct":  # for a while, on demand goes straight to the registry
            assert await client.read(s, 0, 1000) == blob[:1000]
            assert (len(proxy.requests), client.direct) == (1, 2)
            assert await client.read(s, 0, 1000, "prefetch") == blob[:1000]  # not prefetch
            assert len(proxy.requests) == 2


async def test_nydusd_proxy_without_fallback_and_when_unreachable(
        small_blob: tuple[bytes, str], origin: CountingProxy, repo: str) -> None:
    blob, digest = small_blob
    async with aiohttp.ClientSession() as s:
        # A proxy that is not there: a transport error, so straight to the registry.
        gone = Nydus(origin.url, repo, digest, len(blob), proxy=f"http://127.0.0.1:{free_port()}")
        assert await gone.read(s, 10, 5000) == blob[10:5010]
        assert gone.fallbacks == 1
        async with ScriptedProxy([(502, True)] * 5) as proxy:
            # Without fallback a 5xx is an error for retry_op: retried through the proxy, the
            # last on-demand attempt straight to the registry; a prefetch fails.
            strict = Nydus(origin.url, repo, digest, len(blob), proxy=proxy.url, fallback=False)
            assert await strict.read(s, 10, 5000) == blob[10:5010]
            assert (len(proxy.requests), strict.direct, strict.fallbacks) == (3, 1, 0)
            with pytest.raises(ReadFailed):
                await strict.read(s, 10, 5000, "prefetch")
            assert len(proxy.requests) == 5
            # An unhealthy ping: straight to the registry with fallback, an error without.
            sick = Nydus(origin.url, repo, digest, len(blob), proxy=proxy.url,
                         ping_url=f"{proxy.url}/healthy")
            proxy.script = [(503, False), (503, False)]
            assert not await sick.check(s)
            assert await sick.read(s, 10, 5000) == blob[10:5010]
            assert (sick.fallbacks, len(proxy.requests)) == (1, 6)
            strict.ping_url = sick.ping_url
            assert not await strict.check(s)
            with pytest.raises(ReadFailed):
                await strict.read(s, 10, 5000, "prefetch")


async def test_nydusd_mirror_mode_before_july_2025(
        small_blob: tuple[bytes, str], origin: CountingProxy, repo: str) -> None:
    """The old `mirrors` mode: configured headers only, < 500 final, >= 500 to the registry,
    the mirror skipped after `failure_limit` failures."""
    blob, digest = small_blob
    async with ScriptedProxy([(503, False)] * 2 + [(404, False)] * 3) as mirror, \
            aiohttp.ClientSession() as s:
        client = Nydus(origin.url, repo, digest, len(blob), mirror=mirror.url,
                       mirror_headers={"X-Dragonfly-Registry": origin.url}, failure_limit=2)
        assert await client.read(s, 0, 4096) == blob[:4096]
        assert client.fallbacks == 1
        assert mirror.requests[0]["X-Dragonfly-Registry"] == origin.url
        assert not any(k.startswith("X-Dragonfly-P") for k in mirror.requests[0])
        assert await client.read(s, 0, 4096) == blob[:4096]
        assert (client.fallbacks, len(mirror.requests)) == (2, 2)
        # Two failures: the mirror is skipped until its ping answers again.
        assert await client.read(s, 0, 4096) == blob[:4096]
        assert len(mirror.requests) == 2
        client.ping_url = f"{mirror.url}/server/ping"
        mirror.script = [(200, False), *mirror.script]
        assert await client.check(s)
        with pytest.raises(ReadFailed, match="404"):  # < 500 is final: no fallback
            await client.read(s, 0, 4096)
        assert (client.fallbacks, len(mirror.requests)) == (2, 6)
