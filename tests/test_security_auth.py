"""Trust between members, run as attacks on live clusters started with no secret flags at all:
the daemons of one user share a per-user secret, so the scheduler's views, the upload ports and
the operator calls are closed to other callers; a signature is good once, over HTTP and UDP;
a malformed auth header is a 401, never a 500."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path

import aiohttp

from common import auth, datagram
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    free_port,
    member_secret,
    member_session,
    metric,
    naiad,
    push_blob,
    signed,
    until,
)
from tests.registry_auth import basic, htpasswd_yaml, write_htpasswd

MiB = 1 << 20
INTERVAL = 0.5  # tests/cluster.py starts schedulers with --heartbeat-interval 0.5


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, await r.read()


async def _member_json(url: str) -> dict:
    async with member_session() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _held(scheduler: str, digest: str, holders: list[str]) -> dict:
    """The task's full view once every piece is announced by exactly `holders` (announcements
    travel after the pull answers)."""
    view: dict = {}

    async def held() -> bool:
        nonlocal view
        view = await _member_json(f"{scheduler}/api/v1/tasks/{digest}")
        return len(view["piece_map"]) == view["pieces"] \
            and all(p["holders"] == holders for p in view["piece_map"])
    await until(held, what=f"{holders} announcing every piece of {digest}")
    return view


async def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange with bytes no client library would send; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_one_host_with_no_flags_has_no_side_door_to_a_private_blob(
        cluster: Cluster, tmp_path: Path, user_config: Path) -> None:
    """Finding 3: the mirror refuses a client the registry refuses, but the chunk ids (task
    view), the holders' addresses (peer list) and the chunks (upload port) used to hand the
    same blob to anyone on the host."""
    users = {"admin": "root", "alice": "wonderland"}
    registry = Registry(tmp_path / "registry",
                        auth_yaml=htpasswd_yaml(write_htpasswd(tmp_path / "htpasswd", users)))
    front = CountingProxy(registry.port)
    try:
        await registry.ready()
        await front.start()
        blob = os.urandom(3 * MiB + 5)
        digest = await push_blob(registry.url, "team/private", blob,
                                 headers={"Authorization": basic("admin", "root")})
        sched = await cluster.scheduler()
        a = await cluster.peer("a", sched.url, front.url)
        b = await cluster.peer("b", sched.url, front.url)
        alice = {"Authorization": basic("alice", "wonderland")}

        # The one secret, made by the first daemon, private to this user.
        secret_file = user_config / "naiad" / "cluster-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(secret_file.parent.stat().st_mode) == 0o700
        assert len(member_secret()) == 64

        # Pulls through the mirror work, peer to peer: every chunk read between a and b signed.
        assert await _get(f"{a.url}/v2/team/private/blobs/{digest}", alice) == (200, blob)
        view = await _held(sched.url, digest, ["a"])
        assert len(view["piece_map"]) == 4
        assert await _get(f"{b.url}/v2/team/private/blobs/{digest}", alice) == (200, blob)
        assert await metric(b.url, "naiad_peer_download_bytes_total",
                            {"source": "peer"}) == len(blob)

        # The attacker, with no credential: the mirror answers the registry's 401 ...
        status, body = await _get(f"{a.url}/v2/team/private/blobs/{digest}")
        assert status == 401 and blob[:64] not in body
        # ... and the side door is shut: no chunk id, no holder, no upload address.
        chunks = [p["chunk"] for p in view["piece_map"]]
        upload_addrs = [f"127.0.0.1:{n.extra['upload']}" for n in (a, b)]
        status, body = await _get(f"{sched.url}/api/v1/tasks/{digest}")
        task = json.loads(body)
        assert status == 200 and task["task_id"] == digest and task["pieces"] == 4
        assert task["length"] == len(blob) and task["holders"] == 2  # the summary stays
        assert "piece_map" not in task and "leases" not in task
        assert not any(c.encode() in body for c in chunks) and b"blake3:" not in body
        status, body = await _get(f"{sched.url}/api/v1/tasks")
        assert status == 200 and b"blake3:" not in body
        status, body = await _get(f"{sched.url}/api/v1/peers")
        assert status == 200 and {p["id"] for p in json.loads(body)["peers"]} == {"a", "b"}
        assert not any(addr.encode() in body for addr in upload_addrs)
        assert "upload_addr" not in json.loads(body)["peers"][0]
        # Even knowing a chunk id, a holder's upload port gives no byte without a signature.
        for chunk in chunks:
            status, body = await _get(f"http://{upload_addrs[0]}/chunks/{chunk}")
            assert status == 401 and "error" in json.loads(body)
            assert not any(blob[k:k + 32] in body for k in range(0, len(blob), MiB))
        # What the attacker is refused, a member gets: the test could fail.
        full = await _member_json(f"{sched.url}/api/v1/peers")
        assert {p["upload_addr"] for p in full["peers"]} == set(upload_addrs)
        path = f"/chunks/{chunks[0]}"
        status, body = await _get(f"http://{upload_addrs[0]}{path}",
                                  signed("GET", path))
        assert (status, body) == (200, blob[:MiB])
    finally:
        await front.stop()
        registry.stop()


async def test_a_signed_call_is_good_once(cluster: Cluster, registry: Registry,
                                          origin: CountingProxy, repo: str) -> None:
    """Replays: a captured header with its body used to be good again for 300 s (a replayed
    `leave` kept a task at no holders)."""
    blob = os.urandom(2 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a = await cluster.peer("a", sched.url, origin.url)
    assert await _get(f"{a.url}/v2/{repo}/blobs/{digest}") == (200, blob)
    api = f"{sched.url}/api/v1"
    await _held(sched.url, digest, ["a"])
    async with aiohttp.ClientSession() as s:
        # An internal call: the peer's own leave, replayed after the peer registered again.
        body = b"{}"
        leave = signed("POST", f"{api}/peers/a/leave", body)
        async with s.post(f"{api}/peers/a/leave", data=body, headers=leave) as r:
            assert r.status == 200

        async def left() -> bool:
            return (await _member_json(f"{api}/tasks/{digest}"))["holders"] == 0
        await until(left, what="the leave taking a's pieces off the map")
        view = await _held(sched.url, digest, ["a"])  # registered again, re-announced
        async with s.post(f"{api}/peers/a/leave", data=body, headers=leave) as r:
            assert r.status == 401 and "replayed" in (await r.json())["error"]
        assert await _member_json(f"{api}/tasks/{digest}") == view  # a still holds it all
        # A view read by a member, then replayed by whoever saw the header.
        header = signed("GET", f"{api}/tasks/{digest}")
        async with s.get(f"{api}/tasks/{digest}", headers=header) as r:
            assert r.status == 200 and "piece_map" in await r.json()
        async with s.get(f"{api}/tasks/{digest}", headers=header) as r:
            assert r.status == 401 and "piece_map" not in await r.json()
        # A chunk read on the upload port: the bytes once, then nothing.
        chunk = view["piece_map"][0]["chunk"]
        url = f"http://127.0.0.1:{a.extra['upload']}/chunks/{chunk}"
        header = signed("GET", url)
        async with s.get(url, headers=header) as r:
            assert r.status == 200 and await r.read() == blob[:MiB]
        async with s.get(url, headers=header) as r:
            body = await r.read()
            assert r.status == 401 and blob[:32] not in body
            assert "replayed" in json.loads(body)["error"]


class _Relay(asyncio.DatagramProtocol):
    """A UDP hop between a peer and the scheduler that keeps a copy of every datagram: what an
    eavesdropper on the path captures."""

    def __init__(self) -> None:
        self.captured: list[bytes] = []
        self.front: asyncio.DatagramTransport | None = None
        self.back: asyncio.DatagramTransport | None = None
        self.client: tuple[str, int] | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.back is not None
        self.captured.append(data)
        self.client = addr
        self.back.sendto(data)

    async def start(self, target: tuple[str, int]) -> int:
        loop = asyncio.get_running_loop()
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if relay.front is not None and relay.client is not None:
                    relay.front.sendto(data, relay.client)

        self.front, _ = await loop.create_datagram_endpoint(lambda: self,
                                                            local_addr=("127.0.0.1", 0))
        self.back, _ = await loop.create_datagram_endpoint(Back, remote_addr=target)
        return self.front.get_extra_info("sockname")[1]

    def close(self) -> None:
        for t in (self.front, self.back):
            if t is not None:
                t.close()


async def _beats(scheduler: str, result: str) -> float:
    return await metric(scheduler, "naiad_scheduler_heartbeats_total",
                        {"transport": "udp", "result": result})


async def _peer_ids(scheduler: str) -> set[str]:
    async with aiohttp.ClientSession() as s, s.get(f"{scheduler}/api/v1/peers") as r:
        return {p["id"] for p in (await r.json())["peers"]}


async def test_a_replayed_heartbeat_keeps_no_killed_peer_listed(
        cluster: Cluster, registry: Registry) -> None:
    relay = _Relay()
    udp = free_port()
    try:
        port = await relay.start(("127.0.0.1", udp))
        sched = await cluster.scheduler("--udp", f"127.0.0.1:{udp}",
                                        "--udp-advertise", f"127.0.0.1:{port}")
        a = await cluster.peer("a", sched.url, registry.url)

        async def captured() -> bool:
            return len(relay.captured) >= 3 and await _beats(sched.url, "accepted") >= 3
        await until(captured, 10, "heartbeats through the relay")
        a.proc.kill()
        killed = time.monotonic()
        before = await _beats(sched.url, "dropped")
        loop = asyncio.get_running_loop()
        replayer, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=("127.0.0.1", udp))
        sent = 0
        try:
            while "a" in await _peer_ids(sched.url):  # the attack: the captures, again and again
                assert time.monotonic() - killed < 10, "the killed peer stays listed"
                for data in relay.captured[-3:]:
                    replayer.sendto(data)
                    sent += 1
                await asyncio.sleep(INTERVAL / 5)
        finally:
            replayer.close()
        took = time.monotonic() - killed
        assert took <= 3 * INTERVAL + INTERVAL / 2 + 1.0, f"{took:.2f} s"
        assert sent >= 3

        async def all_dropped() -> bool:
            return await _beats(sched.url, "dropped") >= before + sent
        await until(all_dropped, 5, "every replayed datagram counted as dropped")
        # Captured datagrams are genuine: their signature is good, only their nonce is spent.
        beat = datagram.decode(relay.captured[-1], member_secret())
        assert beat.peer_id == "a"
    finally:
        relay.close()


_BAD_VALUES = [b"\xff\xfe\xfd", "\u00e9t\u00e9".encode(), b"garbage", b"1.2.3",
               b"1000." + b"a" * 32 + b"." + b"0" * 64, "\u0661\u0662.x.y".encode(), b"Bearer"]


async def test_malformed_auth_headers_answer_401_with_a_reason(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """A non-ASCII X-Naiad-Auth or Authorization used to answer 500 (str compare_digest)."""
    blob = os.urandom(MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler("--token", "t0k")
    a = await cluster.peer("a", sched.url, origin.url)
    assert await _get(f"{a.url}/v2/{repo}/blobs/{digest}") == (200, blob)
    chunk = (await _held(sched.url, digest, ["a"]))["piece_map"][0]["chunk"]
    port, upload = sched.extra["port"], a.extra["upload"]
    targets = [
        (port, b"POST /api/v1/announce", b"{}"),  # internal
        (port, b"GET /api/v1/tasks/" + digest.encode(), b""),  # a view
        (port, b"DELETE /api/v1/peers/a", b""),  # an operator call
        (upload, b"GET /chunks/" + chunk.encode(), b""),  # the upload port
    ]
    checked = 0
    for header in (b"X-Naiad-Auth", b"Authorization"):
        for value in _BAD_VALUES:
            for target_port, line, body in targets:
                if header == b"Authorization" and target_port == upload:
                    continue  # the upload port reads no Authorization
                request = (line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b": "
                           + value + b"\r\nContent-Type: application/json\r\nContent-Length: "
                           + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                status, reply = await _raw(target_port, request)
                assert status == 401, (header, value, line, status, reply)
                assert json.loads(reply)["error"], reply
                assert blob[:32] not in reply
                checked += 1
    assert checked == len(_BAD_VALUES) * 7
    peers = await _member_json(f"{sched.url}/api/v1/peers")
    assert [p["cordoned"] for p in peers["peers"]] == [False]


async def test_operator_calls_need_a_signature_or_the_token(
        cluster: Cluster, registry: Registry) -> None:
    """Finding 5: with no --token, anyone could cordon every peer or make the scheduler fetch
    any URL (preheat)."""
    sched = await cluster.scheduler()
    await cluster.peer("a", sched.url, registry.url)
    api = f"{sched.url}/api/v1"
    preheat = json.dumps({"url": f"{registry.url}/v2/", "digest": "sha256:" + "0" * 64}
                         ).encode()
    async with aiohttp.ClientSession() as s:
        for method, url, body in (("DELETE", f"{api}/peers/a", b""),
                                  ("POST", f"{api}/peers/a/uncordon", b""),
                                  ("POST", f"{api}/preheat", preheat)):
            async with s.request(method, url, data=body,
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 401, (method, url, await r.text())
                assert "sign it" in (await r.json())["error"]
        async with s.get(f"{api}/jobs") as r:
            assert (await r.json())["jobs"] == []
        async with s.get(f"{api}/peers/a") as r:
            assert (await r.json())["cordoned"] is False
        # The same call signed (naiad status and preheat do it with the per-user secret) works.
        async with s.delete(f"{api}/peers/a", headers=signed("DELETE", f"{api}/peers/a")) as r:
            assert r.status == 200
        async with s.get(f"{api}/peers/a") as r:
            assert (await r.json())["cordoned"] is True

    # With --token, only the token does: a member's signature is not an operator's.
    tokened = await cluster.scheduler("--token", "t0k", name="tokened")
    await cluster.peer("b", tokened.url, registry.url)
    api = f"{tokened.url}/api/v1"
    async with aiohttp.ClientSession() as s:
        for headers in (signed("DELETE", f"{api}/peers/b"), {"Authorization": "Bearer nope"}):
            async with s.delete(f"{api}/peers/b", headers=headers) as r:
                assert r.status == 401
        async with s.delete(f"{api}/peers/b", headers={"Authorization": "Bearer t0k"}) as r:
            assert r.status == 200
        # The token also opens the views (an operator without the secret).
        async with s.get(f"{api}/peers", headers={"Authorization": "Bearer t0k"}) as r:
            assert "upload_addr" in (await r.json())["peers"][0]


async def _run(*args: str, seconds: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds)
    return proc.returncode, out.decode()


async def test_naiad_status_needs_no_flags_on_one_host(cluster: Cluster, registry: Registry,
                                                       tmp_path: Path) -> None:
    sched = await cluster.scheduler()
    a = await cluster.peer("a", sched.url, registry.url)
    rc, out = await _run(*naiad("status", "--scheduler", sched.url, "--json"))
    assert rc == 0, out
    peers = json.loads(out)["peers"]
    # Signed with the per-user secret: the full view, upload addresses included.
    assert [p["upload_addr"] for p in peers] == [f"127.0.0.1:{a.extra['upload']}"]
    rc, out = await _run(*naiad("status", "--scheduler", sched.url))
    assert rc == 0 and f"127.0.0.1:{a.extra['upload']}" in out, out

    # A scheduler on this host with a secret of its own: the per-user one is refused, so
    # status shows the summary; given the right secret file, everything.
    secret_file = tmp_path / "secret"
    secret_file.write_text("another secret")
    other = await cluster.scheduler("--cluster-secret-file", str(secret_file), name="other")
    b = await cluster.peer("b", other.url, registry.url, "--cluster-secret-file",
                           str(secret_file))
    rc, out = await _run(*naiad("status", "--scheduler", other.url, "--json"))
    assert rc == 0, out
    assert [p["id"] for p in json.loads(out)["peers"]] == ["b"]
    assert "upload_addr" not in json.loads(out)["peers"][0]
    rc, out = await _run(*naiad("status", "--scheduler", other.url, "--cluster-secret-file",
                                str(secret_file)))
    assert rc == 0 and f"127.0.0.1:{b.extra['upload']}" in out, out


async def test_a_secret_open_to_others_stops_start_up_with_one_line(user_config: Path) -> None:
    secret = user_config / "naiad" / "cluster-secret"
    secret.parent.mkdir(mode=0o700)
    secret.write_text("s" * 64)
    secret.chmod(0o644)
    for command, more in (("scheduler", ()), ("peer", ("--data-dir", str(user_config)))):
        rc, out = await _run(*naiad(command, "--listen", f"127.0.0.1:{free_port()}", *more))
        assert rc == 2, out
        assert out.strip() == f"naiad {command}: the per-user cluster secret {secret} is open " \
                              "to group or others (mode 0644): chmod 600 it", out
    assert auth.user_secret_path() == secret  # where every daemon of this user looks
