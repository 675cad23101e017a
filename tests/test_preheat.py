"""Preheat: an image in a real registry is resolved, seed peers fetch every blob, and pulls
through other peers afterwards move no blob bytes from the registry."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp

from tests.cluster import Cluster, CountingProxy, Node, Registry, push_blob
from tests.images import MANIFEST, push_image

MiB = 1 << 20
SMALL = 64 * 1024  # manifests and access checks, never a blob


async def _naiad(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode()


async def test_preheat_an_image_then_pulls_take_nothing_from_the_registry(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    image = await push_image(registry.url, repo, "v1", [3 * MiB, 2 * MiB + 5, 700_000])
    arm = await push_image(registry.url, repo, "arm", [4 * MiB])
    # A manifest list naming the image for linux/amd64 (and a platform nobody preheats).
    index = json.dumps({"schemaVersion": 2, "mediaType":
                        "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": MANIFEST, "digest": image.manifest_digest, "size": len(image.manifest),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MANIFEST, "digest": arm.manifest_digest, "size": len(arm.manifest),
         "platform": {"os": "linux", "architecture": "arm64"}}]}).encode()
    async with aiohttp.ClientSession() as s, s.put(
            f"{registry.url}/v2/{repo}/manifests/multi", data=index,
            headers={"Content-Type": "application/vnd.oci.image.index.v1+json"}) as r:
        assert r.status == 201, await r.text()
    sched = await cluster.scheduler("--token", "op-token", "--allow-registry", origin.url)
    await cluster.peer("seed", sched.url, origin.url, "--seed")
    a, b = await asyncio.gather(cluster.peer("a", sched.url, origin.url),
                                cluster.peer("b", sched.url, origin.url))

    rc, out = await _naiad("preheat", f"http://{origin.host}/{repo}:multi",
                           "--scheduler", sched.url, "--token", "op-token")
    assert rc == 0, out
    assert "4 blobs" in out, out  # the config and 3 layers of the amd64 image, not arm64

    before = origin.bytes_down
    async with aiohttp.ClientSession() as s:
        for peer in (a, b):
            for digest, size in [*image.layers, (image.config_digest, 0)]:
                async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
                    body = await r.read()
                    assert r.status == 200 and (size == 0 or len(body) == size)
    assert origin.bytes_down - before < SMALL, "a preheated blob came from the registry"

    # Jobs are listed; a job for a missing image fails with a reason; the token is required.
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sched.url}/api/v1/jobs") as r:
            jobs = (await r.json())["jobs"]
            assert [j["state"] for j in jobs] == ["done"]
        async with s.post(f"{sched.url}/api/v1/preheat",
                          json={"image": f"http://{origin.host}/{repo}:v1"}) as r:
            assert r.status == 401
    rc, out = await _naiad("preheat", f"http://{origin.host}/{repo}:nope",
                           "--scheduler", sched.url, "--token", "op-token")
    assert rc == 1 and "404" in out, out
    rc, out = await _naiad("preheat", f"http://{origin.host}/{repo}:v1", "--no-wait",
                           "--scheduler", sched.url, "--token", "op-token")
    assert rc == 0 and len(out.strip()) == 16, out


async def test_preheat_a_url_and_refuse_registries_off_the_seeds_allow_list(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = b"x" * (3 * MiB + 1)
    digest = await push_blob(registry.url, repo, blob)
    # The scheduler may direct seeds at 127.0.0.1:9; the seed's own allow-list still says no.
    sched = await cluster.scheduler("--allow-registry", origin.url,
                                    "--allow-registry", "http://127.0.0.1:9")
    seed = await cluster.peer("seed", sched.url, origin.url, "--seed")
    url = f"{origin.url}/v2/{repo}/blobs/{digest}?token=abc"
    rc, out = await _naiad("preheat", "--url", url, "--digest", digest, "--scheduler",
                           sched.url)
    assert rc == 0, out
    before = origin.bytes_down
    async with aiohttp.ClientSession() as s, s.get(f"{seed.url}/download",
                                                   params={"url": url}) as r:
        assert await r.read() == blob
        assert r.headers["X-Naiad-Source"] == "local"
    assert origin.bytes_down - before < SMALL
    # A job naming a registry the seed may not reach is never fetched.
    rc, out = await _naiad("preheat", "--url", "http://127.0.0.1:9/secret", "--no-wait",
                           "--scheduler", sched.url)
    assert rc == 0
    assert "not on this peer's allow-list" in await _logs_when(seed, "allow-list")


async def _logs_when(node: Node, needle: str) -> str:
    for _ in range(200):
        logs = node.proc.logs()
        if needle in logs:
            return logs
        await asyncio.sleep(0.05)
    return node.proc.logs()
