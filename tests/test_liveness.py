"""Liveness: a peer that dies without a word is expired within three heartbeat intervals and its
pieces are never handed out again; heartbeats travel over UDP and fall back to HTTP."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp

from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    metric,
    push_blob,
    until,
)

MiB = 1 << 20
INTERVAL = 0.5  # tests/cluster.py starts schedulers with --heartbeat-interval 0.5


async def _peer_ids(scheduler: str) -> set[str]:
    async with aiohttp.ClientSession() as s, s.get(f"{scheduler}/api/v1/peers") as r:
        return {p["id"] for p in (await r.json())["peers"]}


async def test_killed_peer_expires_within_three_intervals_and_is_never_handed_out(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(4 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a, b = await asyncio.gather(cluster.peer("a", sched.url, origin.url),
                                cluster.peer("b", sched.url, origin.url))
    async with aiohttp.ClientSession() as s, s.get(f"{a.url}/v2/{repo}/blobs/{digest}") as r:
        assert await r.read() == blob

    a.proc.kill()
    killed = time.monotonic()

    async def gone() -> bool:
        return "a" not in await _peer_ids(sched.url)
    await until(gone, 10, "the killed peer leaving the list")
    took = time.monotonic() - killed
    # Expired after 3 silent intervals, noticed by an expiry pass every half interval.
    assert took <= 3 * INTERVAL + INTERVAL / 2 + 0.5, f"{took:.2f} s"
    async with member_session() as m, m.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
        task = await r.json()
    async with aiohttp.ClientSession() as s:
        assert all("a" not in p["holders"] for p in task["piece_map"])
        async with s.get(f"{b.url}/v2/{repo}/blobs/{digest}") as r:
            assert await r.read() == blob
    # b was never sent to the dead peer: nothing from peers, nothing failed, all from origin.
    assert await metric(b.url, "naiad_peer_download_bytes_total", {"source": "peer"}) == 0
    assert await metric(b.url, "naiad_peer_download_bytes_total",
                        {"source": "origin"}) == len(blob)
    assert "a" not in await _peer_ids(sched.url)


async def _beats(scheduler: str, transport: str, result: str = "accepted") -> float:
    return await metric(scheduler, "naiad_scheduler_heartbeats_total",
                        {"transport": transport, "result": result})


async def test_heartbeats_travel_over_udp(cluster: Cluster, registry: Registry) -> None:
    sched = await cluster.scheduler()
    await cluster.peer("a", sched.url, registry.url)

    async def beating() -> bool:
        return await _beats(sched.url, "udp") >= 4
    await until(beating, 10, "four heartbeats over UDP")
    assert await _beats(sched.url, "http") == 0
    assert "a" in await _peer_ids(sched.url)


class _BlackHole(asyncio.DatagramProtocol):
    """A UDP port that swallows every datagram: a firewall between peer and scheduler."""

    def __init__(self) -> None:
        self.received = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1


async def test_heartbeats_fall_back_to_http_when_udp_does_not_get_through(
        cluster: Cluster, registry: Registry) -> None:
    loop = asyncio.get_running_loop()
    transport, hole = await loop.create_datagram_endpoint(_BlackHole,
                                                          local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        sched = await cluster.scheduler("--udp-advertise", f"127.0.0.1:{port}")
        await cluster.peer("a", sched.url, registry.url)

        async def over_http() -> bool:
            return await _beats(sched.url, "http") >= 4
        await until(over_http, 15, "heartbeats carried over HTTP")
        assert hole.received >= 2  # it tried UDP first
        assert await _beats(sched.url, "udp") == 0
        # Alive all along: never silent for three intervals, so never expired.
        started = time.monotonic()
        while time.monotonic() - started < 4 * INTERVAL:
            assert "a" in await _peer_ids(sched.url)
            await asyncio.sleep(INTERVAL / 2)
    finally:
        transport.close()


async def test_forged_and_malformed_datagrams_are_dropped_unanswered(
        cluster: Cluster, registry: Registry) -> None:
    from common import datagram
    from common.models import Heartbeat

    sched = await cluster.scheduler("--cluster-secret", "s" * 32)
    await cluster.peer("a", sched.url, registry.url, "--cluster-secret", "s" * 32)
    udp = ("127.0.0.1", sched.extra["udp"])
    bad = [
        os.urandom(64),
        os.urandom(4000),  # oversized
        b"\n",
        b'{"v":1,"id":"a","ts":1}\n',
        datagram.encode("a", Heartbeat(), b"w" * 32),  # signed with the wrong secret
        datagram.encode("a", Heartbeat(), None),  # unsigned
        datagram.encode("a", Heartbeat(), b"s" * 32, now=time.time() - 3600),  # stale
    ]
    answers: list[bytes] = []

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            answers.append(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=udp)
    try:
        for round_ in range(1, 6):  # in rounds: a burst could overflow the socket buffer
            for data in bad:
                transport.sendto(data)

            async def all_dropped(n: int = round_ * len(bad)) -> bool:
                return await _beats(sched.url, "udp", "dropped") >= n
            await until(all_dropped, 10, "every bad datagram counted as dropped")
        # A well-signed heartbeat from a stranger is answered "unknown" (register first) ...
        transport.sendto(datagram.encode("mallory", Heartbeat(), b"s" * 32))

        async def answered() -> bool:
            return bool(answers)
        await until(answered, 5, "an answer to the stranger's heartbeat")
    finally:
        transport.close()
    assert answers == [datagram.ACK_UNKNOWN]  # ... and nothing else was ever answered
    assert "mallory" not in await _peer_ids(sched.url)
    assert await _beats(sched.url, "udp", "unknown") == 1
    # The real peer kept beating through it all.
    before = await _beats(sched.url, "udp")

    async def still_beating() -> bool:
        return await _beats(sched.url, "udp") >= before + 2
    await until(still_beating, 10, "the real peer's heartbeats")
