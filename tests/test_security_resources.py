"""Finding 7 of the security review, as attacks on live daemons: connections that never finish
their request headers used to exhaust a peer's file descriptors, so `/healthy` and pulls failed
on the mirror port too and the log filled with accept() errors.

Now every server of ours (scheduler API, mirror, upload port) closes a connection that has not
sent complete headers within --header-timeout, caps what one remote address holds
(--connections-per-address; the excess closed at once), daemons raise their soft descriptor
limit to the hard one, and accept() failures are logged once per 10 s. The attacker connects
from 127.0.0.2, so the honest clients on 127.0.0.1 are other addresses, as on a real network.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import aiohttp

from common.limits import PerAddress, Throttle
from tests.cluster import (
    Cluster,
    Node,
    Registry,
    free_port,
    naiad,
    push_blob,
    spawn,
    until,
    wait_http,
    wait_registered_peer,
)

MiB = 1 << 20
ATTACKER = "127.0.0.2"
SLOW_HEAD = b"GET /healthy HTTP/1.1\r\nHost: x\r\nX-Slow: "


def nofile(pid: int) -> tuple[int, int]:
    """The soft and hard open-files limits of a process, from /proc."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft, hard = re.findall(r"\d+|unlimited", line)[:2]
    return int(soft), int(hard)


async def limited(cluster: Cluster, name: str, argv: list[str], limits: str, url: str) -> Node:
    """A daemon started under `prlimit --nofile=SOFT:HARD` (which execs it: same pid)."""
    proc = spawn(name, ["prlimit", f"--nofile={limits}", "--", *argv], cluster.workdir)
    node = Node(name, proc, url)
    cluster.nodes.append(node)
    await wait_http(f"{url}/healthy", proc=proc)
    return node


async def limited_peer(cluster: Cluster, name: str, sched: Node, registry: str, limits: str,
                       *args: str) -> Node:
    argv, listen, upload = cluster.peer_args(name, sched.url, registry, *args)
    node = await limited(cluster, name, argv, limits, f"http://127.0.0.1:{listen}")
    node.extra["upload"] = upload
    await wait_registered_peer(sched.url, name)
    return node


async def slow_connection(port: int, opened: asyncio.Event | None = None) -> float:
    """A connection from the attacker's address that never finishes its request headers: the
    seconds until the server closed it."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(ATTACKER, 0))
    try:
        writer.write(SLOW_HEAD)
        await writer.drain()
        if opened is not None:
            opened.set()
        data = await asyncio.wait_for(reader.read(), 30)
        assert data == b"", data  # nothing answered: the request never came
    except (ConnectionError, OSError):
        pass  # reset: refused over the cap
    finally:
        writer.close()
    return loop.time() - started


async def test_slow_connections_to_the_upload_port_leave_the_peer_serving(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    blob = os.urandom(3 * MiB + 5)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    # Soft limit 200, hard 400: without the raise, 240 connections are past the soft limit.
    a = await limited_peer(cluster, "a", sched, registry.url, "200:400",
                           "--header-timeout", "2", "--connections-per-address", "64")
    assert nofile(a.proc.popen.pid) == (400, 400)
    b = await cluster.peer("b", sched.url, registry.url)
    async with aiohttp.ClientSession() as s, s.get(f"{a.url}/v2/{repo}/blobs/{digest}") as r:
        assert r.status == 200 and await r.read() == blob

    attack = [asyncio.create_task(slow_connection(a.extra["upload"])) for _ in range(240)]
    try:
        await asyncio.sleep(0.3)  # the connections are made (a readiness check cannot see it)
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{a.url}/healthy") as r:
                assert r.status == 200
            # A real pull through another peer, whose pieces come from a's upload port.
            async with s.get(f"{b.url}/v2/{repo}/blobs/{digest}") as r:
                assert r.status == 200 and await r.read() == blob
                assert r.headers["X-Naiad-Source"] == "peer", dict(r.headers)
        assert time.monotonic() - started < 1.5, "the attacked peer answered slowly"
        assert not all(t.done() for t in attack), "every slow connection was already closed"
        closed = await asyncio.wait_for(asyncio.gather(*attack), 10)
    finally:
        for t in attack:
            t.cancel()
    refused = [t for t in closed if t < 1.0]
    held = [t for t in closed if t >= 1.0]
    assert len(refused) == 240 - 64 and len(held) == 64, (len(refused), len(held))
    assert all(1.5 < t < 4.0 for t in held), held  # the 2 s header deadline
    logs = a.proc.logs()
    assert logs.count("already holds 64 connections") == 1, logs  # once per 10 s
    assert "accept()" not in logs and "Traceback" not in logs, logs
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{a.extra['upload']}/healthy") as r:
        assert r.status == 200


async def test_every_server_has_a_header_deadline(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    blob = os.urandom(24 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    port = free_port()
    sched = await limited(cluster, "scheduler", naiad(
        "scheduler", "--listen", f"127.0.0.1:{port}", "--udp", "off", "--header-timeout", "1"),
        "256:1024", f"http://127.0.0.1:{port}")
    assert nofile(sched.proc.popen.pid) == (1024, 1024)
    peer = await cluster.peer("p", sched.url, registry.url, "--header-timeout", "1")
    ports = {"scheduler": port, "mirror": int(peer.url.rsplit(":", 1)[1]),
             "upload": peer.extra["upload"]}
    closed = dict(zip(ports, await asyncio.gather(*(slow_connection(p)
                                                    for p in ports.values())), strict=True))
    assert all(0.8 < t < 2.5 for t in closed.values()), closed

    # An idle keep-alive connection ends at the deadline too.
    reader, writer = await asyncio.open_connection("127.0.0.1", ports["mirror"])
    writer.write(b"GET /healthy HTTP/1.1\r\nHost: x\r\n\r\n")
    answered = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"ok\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.8 < time.monotonic() - answered < 2.5
    writer.close()

    # A response longer than the deadline is not cut: the deadline is for headers only.
    started = time.monotonic()
    got = bytearray()
    async with aiohttp.ClientSession() as s, s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(MiB):
            got += chunk
            await asyncio.sleep(0.1)
    assert bytes(got) == blob
    assert time.monotonic() - started > 2.0


async def test_out_of_descriptors_the_log_stays_quiet_and_the_peer_recovers(
        cluster: Cluster, registry: Registry, repo: str) -> None:
    blob = os.urandom(MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    # No cap to speak of and few descriptors: the attack does exhaust them.
    peer = await limited_peer(cluster, "p", sched, registry.url, "128:128",
                              "--header-timeout", "3", "--connections-per-address", "100000")
    before = len(peer.proc.logs())
    opened = [asyncio.Event() for _ in range(300)]
    attack = [asyncio.create_task(slow_connection(peer.extra["upload"], e)) for e in opened]
    try:
        await until(lambda: _all_set(opened), 10, "the attack's connections opened")
        await asyncio.sleep(2.0)  # out of descriptors for a while: what does the log say?
        flood = peer.proc.logs()[before:]
        assert flood.count("accept() failed") == 1, flood[:2000]  # it did run out
        assert len(flood) < 4000 and "Traceback" not in flood, flood[:2000]
        # The deadline frees the descriptors: the peer serves again by itself.
        await wait_http(f"{peer.url}/healthy", seconds=20, proc=peer.proc)
        async with aiohttp.ClientSession() as s, \
                s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
            assert r.status == 200 and await r.read() == blob
    finally:
        for t in attack:
            t.cancel()
        await asyncio.gather(*attack, return_exceptions=True)


async def _all_set(events: list[asyncio.Event]) -> bool:
    return all(e.is_set() for e in events)


def test_per_address_counts_and_throttle_cores() -> None:
    held = PerAddress(2)
    assert held.admit("a") and held.admit("a") and not held.admit("a")
    assert held.admit("b")  # another address has its own count
    held.release("a")
    assert held.admit("a") and not held.admit("a")
    for _ in range(2):
        held.release("a")
    held.release("b")
    assert held.held == {}  # nothing kept for addresses that hold nothing

    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.ready() == 0
    assert [throttle.ready() for _ in range(5)] == [None] * 5
    now[0] = 10.0
    assert throttle.ready() == 5  # the next line says how many were not logged
    assert throttle.ready() is None
