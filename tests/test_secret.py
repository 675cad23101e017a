"""The cluster secret: members sign every internal request; strangers can neither join, nor
poison the chunk map, nor read chunks."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import aiohttp
import pytest

from common import auth, ids
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    push_blob,
    signed,
    until,
)

MiB = 1 << 20
SECRET = "correct horse battery staple"


def test_signature_binds_time_nonce_method_path_and_body() -> None:
    key = b"k"
    header = auth.sign(key, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
    ts, nonce, mac = header.split(".")
    assert ts == "1000" and len(nonce) == 32 and len(mac) == 64
    assert auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
    skew = auth.MAX_SKEW_SECONDS
    assert auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":1}', now=1000 + skew)
    assert not auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":1}',
                           now=1000 + skew + 1)
    assert not auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":2}', now=1000)
    assert not auth.verify(key, header, "POST", "/api/v1/schedule", b'{"a":1}', now=1000)
    assert not auth.verify(key, header, "GET", "/api/v1/announce", b'{"a":1}', now=1000)
    assert not auth.verify(b"other", header, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
    # The nonce is inside the MAC: another nonce (to dodge the replay check) breaks it.
    other = f"{ts}.{'0' * 32}.{mac}"
    assert not auth.verify(key, other, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
    assert auth.sign(key, "GET", "/x", now=1000) != auth.sign(key, "GET", "/x", now=1000)
    for bad in (None, "", "x", "1000", "1000.", ".abc", "99999999999999.aa", "-1.aa",
                f"1000.{mac}", f"{ts}.{nonce}.{mac}.", f"{ts}.{nonce.upper()}.{mac}",
                f"{ts}.{nonce}.{mac[:-1]}\u00e9", f"{ts}.{nonce}.{mac[:-1]}\udcff",
                "\u0661\u0662.aa.bb"):  # Arabic-Indic digits pass str.isdigit()
        with pytest.raises(auth.AuthError) as e:
            auth.check(key, bad, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
        assert e.value.status == 401 and e.value.reason


def test_nonce_cache_refuses_a_repeat_expires_by_time_and_is_bounded() -> None:
    cache = auth.NonceCache(capacity=3, window=300)
    a, b, c, d = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
    cache.admit(a, ts=1000, now=1000)
    with pytest.raises(auth.AuthError, match="replayed"):
        cache.admit(a, ts=1000, now=1200)
    cache.admit(a, ts=1001, now=1001)  # same nonce, other second: another signature's
    cache.admit(b, ts=1100, now=1100)
    with pytest.raises(auth.AuthError) as full:
        cache.admit(c, ts=1100, now=1100)
    assert full.value.status == 503  # full: refused, no live nonce forgotten
    with pytest.raises(auth.AuthError, match="replayed"):
        cache.admit(a, ts=1000, now=1100)
    # Once 1000 and 1001 are out of the window their nonces go, and room with them.
    cache.admit(c, ts=1302, now=1302)
    cache.admit(d, ts=1302, now=1302)
    assert cache.size == 3
    with pytest.raises(auth.AuthError, match="replayed"):
        cache.admit(b, ts=1100, now=1302)


def test_verifier_accepts_a_signature_once() -> None:
    v = auth.Verifier(b"k")
    header = auth.sign(b"k", "POST", "/p", b"body", now=1000)
    v.check(header, "POST", "/p", b"body", now=1000)
    with pytest.raises(auth.AuthError, match="replayed"):
        v.check(header, "POST", "/p", b"body", now=1001)
    with pytest.raises(auth.AuthError, match="invalid"):  # a forgery never enters the cache
        v.check(auth.sign(b"x", "POST", "/p", b"body", now=1000), "POST", "/p", b"body",
                now=1000)
    assert v.nonces.size == 1


def test_bearer_tokens_compare_as_bytes() -> None:
    assert auth.bearer_matches("Bearer t0k", "t0k")
    assert auth.bearer_matches("Bearer j\u00e9ton", "j\u00e9ton")
    for bad in (None, "", "Bearer", "Bearer t0", "bearer t0k", "Bearer t0k\u00e9",
                "Bearer t0k\udcff", "\udcff" * 10):
        assert not auth.bearer_matches(bad, "t0k")


def test_the_per_user_secret_is_made_once_private_and_shared(tmp_path: Path) -> None:
    path = auth.user_secret_path({"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert path == tmp_path / "cfg" / "naiad" / "cluster-secret"
    assert auth.user_secret_path({"XDG_CONFIG_HOME": "relative", "HOME": "/h"}) == \
        Path("/h/.config/naiad/cluster-secret")
    assert auth.user_secret(path, create=False) is None
    results: list[bytes | None] = []
    racers = [threading.Thread(target=lambda: results.append(auth.user_secret(path)))
              for _ in range(8)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert len(set(results)) == 1 and len(results[0] or b"") == 64  # one winner, all read it
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["cluster-secret"]  # no temp file left
    assert auth.user_secret(path) == results[0]
    path.chmod(0o640)
    with pytest.raises(auth.SecretError, match="group or others"):
        auth.user_secret(path)
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(auth.SecretError, match="empty"):
        auth.user_secret(path)
    with pytest.raises(auth.SecretError, match="cannot read"):
        auth.load_secret(None, str(tmp_path / "missing"))


async def test_strangers_are_refused_members_distribute(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    blob = os.urandom(4 * MiB + 1)
    digest = await push_blob(registry.url, repo, blob)
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    sched = await cluster.scheduler("--cluster-secret", SECRET)
    a = await cluster.peer("a", sched.url, origin.url, "--cluster-secret", SECRET)
    b = await cluster.peer("b", sched.url, origin.url, "--cluster-secret-file", str(secret_file))
    async with aiohttp.ClientSession() as s:
        for peer in (a, b):
            async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
                assert await r.read() == blob
        task: dict = {}

        member = member_session(SECRET.encode())

        async def both_hold() -> bool:  # announcements travel after the pull answers
            nonlocal task
            async with member.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
                task = await r.json()  # chunk ids and holders: members only
            # Both hashed the whole blob: their two confirmations seal the map. Wait for that
            # too, so the snapshot compared below is final.
            return task["sealed"] and \
                all(set(p["holders"]) == {"a", "b"} for p in task["piece_map"])

        await until(both_hold, what="a and b announced and confirmed under the secret")
        chunk = task["piece_map"][0]["chunk"]

        api = f"{sched.url}/api/v1"
        calls = [
            ("/peers", {"id": "mallory", "upload_addr": "127.0.0.1:9"}),
            ("/announce", {"peer_id": "a", "task_id": digest,
                           "pieces": [{"index": 0, "chunk": ids.chunk_id(b"poison")}]}),
            ("/schedule", {"peer_id": "a", "task_id": digest, "pieces": [0]}),
            ("/reports", {"peer_id": "a", "parent_id": "b", "task_id": digest,
                          "kind": "corrupt"}),
            ("/peers/a/heartbeat", {}),
            ("/peers/a/leave", {}),
        ]
        for path, body in calls:
            raw = json.dumps(body).encode()
            forged = auth.sign(b"wrong secret", "POST", f"/api/v1{path}", raw)
            # A member's header for another body (an empty one) cannot carry this body.
            replayed = signed("POST", api + path, b"[]", SECRET.encode())[auth.HEADER]
            for headers in ({}, {auth.HEADER: forged}, {auth.HEADER: replayed}):
                async with s.post(api + path, data=raw,
                                  headers={"Content-Type": "application/json", **headers}) as r:
                    assert r.status == 401, (path, headers, await r.text())
        upload = f"http://127.0.0.1:{a.extra['upload']}/chunks/{chunk}"
        async with s.get(upload) as r:
            assert r.status == 401
        path = f"/chunks/{chunk}"
        async with s.get(upload, headers={auth.HEADER: auth.sign(SECRET.encode(), "GET",
                                                                  path)}) as r:
            assert r.status == 200 and len(await r.read()) == 1 * MiB
        # Nothing the stranger sent changed the map.
        async with member.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
            assert await r.json() == task
        async with s.get(f"{api}/peers") as r:
            assert {p["id"] for p in (await r.json())["peers"]} == {"a", "b"}
        await member.close()


async def test_a_peer_with_the_wrong_secret_is_kept_out_but_still_serves(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(2 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler("--cluster-secret", SECRET)
    intruder = await cluster.peer("intruder", sched.url, origin.url, "--cluster-secret",
                                  "guess", wait_registered=False)

    async def refused() -> bool:
        return "refused registration" in intruder.proc.logs()
    await until(refused, 20, "the scheduler refusing the intruder")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{intruder.url}/v2/{repo}/blobs/{digest}") as r:
            assert r.status == 200 and await r.read() == blob
            assert "scheduler-unreachable" in r.headers["X-Naiad-Origin-Reason"]
        async with s.get(f"{sched.url}/api/v1/peers") as r:
            assert (await r.json())["peers"] == []

