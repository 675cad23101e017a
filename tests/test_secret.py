"""The cluster secret: members sign every internal request; strangers can neither join, nor
poison the chunk map, nor read chunks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp

from common import auth, ids
from tests.cluster import Cluster, CountingProxy, Registry, push_blob, until

MiB = 1 << 20
SECRET = "correct horse battery staple"


def test_signature_binds_time_method_path_and_body() -> None:
    key = b"k"
    header = auth.sign(key, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
    assert auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
    assert auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":1}', now=1299)
    assert not auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":1}', now=1301)
    assert not auth.verify(key, header, "POST", "/api/v1/announce", b'{"a":2}', now=1000)
    assert not auth.verify(key, header, "POST", "/api/v1/schedule", b'{"a":1}', now=1000)
    assert not auth.verify(key, header, "GET", "/api/v1/announce", b'{"a":1}', now=1000)
    assert not auth.verify(b"other", header, "POST", "/api/v1/announce", b'{"a":1}', now=1000)
    for bad in (None, "", "x", "1000", "1000.", ".abc", "99999999999999.aa", "-1.aa"):
        assert not auth.verify(key, bad, "POST", "/api/v1/announce", b'{"a":1}', now=1000)


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

        async def both_hold() -> bool:  # announcements travel after the pull answers
            nonlocal task
            async with s.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
                task = await r.json()  # operators read without the secret
            return all(set(p["holders"]) == {"a", "b"} for p in task["piece_map"])

        await until(both_hold, what="a and b announced under the secret")
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
            replayed = auth.sign(SECRET.encode(), "POST", f"/api/v1{path}", b"[]")
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
        async with s.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
            assert await r.json() == task
        async with s.get(f"{api}/peers") as r:
            assert {p["id"] for p in (await r.json())["peers"]} == {"a", "b"}


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

