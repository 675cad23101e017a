"""The mirror front against a real registry: what goes peer-to-peer, what passes through
unchanged, what is refused and how; and `naiad get` through it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote

import aiohttp

from tests.cluster import Cluster, CountingProxy, Registry, push_blob

MiB = 1 << 20


async def _push_manifest(registry: Registry, repo: str, layer: str, size: int) -> tuple[str,
                                                                                        bytes]:
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    config_digest = await push_blob(registry.url, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": size, "digest": layer}],
    }).encode()
    async with aiohttp.ClientSession() as s, s.put(
            f"{registry.url}/v2/{repo}/manifests/v1", data=manifest,
            headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}
    ) as r:
        assert r.status == 201, await r.text()
    return "sha256:" + hashlib.sha256(manifest).hexdigest(), manifest


async def test_passthrough_refusals_and_head(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(MiB + 99)
    digest = await push_blob(registry.url, repo, blob)
    manifest_digest, manifest = await _push_manifest(registry, repo, digest, len(blob))
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{peer.url}/v2/") as r:
            assert r.status == 200
            assert r.headers.get("Docker-Distribution-Api-Version") == "registry/2.0"
        async with s.get(f"{peer.url}/v2/{repo}/manifests/v1", headers=accept) as r:
            assert r.status == 200
            assert await r.read() == manifest
            assert r.headers["Docker-Content-Digest"] == manifest_digest
        async with s.head(f"{peer.url}/v2/{repo}/manifests/v1", headers=accept) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == len(manifest)
        async with s.get(f"{peer.url}/v2/{repo}/tags/list") as r:
            assert (await r.json())["tags"] == ["v1"]
        # HEAD of a blob: its size, no body, nothing fetched.
        async with s.head(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == len(blob)
            assert r.headers["Docker-Content-Digest"] == digest
            assert await r.read() == b""
        # An unknown blob: the registry's own 404, body and all.
        missing = "sha256:" + "0" * 64
        async with s.get(f"{peer.url}/v2/{repo}/blobs/{missing}") as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        # Malformed requests are refused with a reason.
        async with s.get(f"{peer.url}/v2/{repo}/blobs/sha256:xyz") as r:
            assert r.status == 400 and "digest" in (await r.json())["error"]
        async with s.get(f"{peer.url}/v2/UPPER/blobs/{digest}") as r:
            assert r.status == 400 and "repository" in (await r.json())["error"]
        # Registries off the allow-list are never reached.
        async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}",
                         headers={"X-Dragonfly-Registry": "https://evil.example"}) as r:
            assert r.status == 403 and "allow-list" in (await r.json())["error"]
        async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}?ns=evil.example") as r:
            assert r.status == 403
        async with s.get(f"{peer.url}/nothing-here") as r:
            assert r.status == 404
    assert origin.bytes_down < len(blob), "no blob body should have been fetched"


async def test_upstream_from_header_and_ns(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """The default registry is unreachable; the upstream comes from X-Dragonfly-Registry or
    containerd's ?ns=, whose scheme comes from the allow-list."""
    blob = os.urandom(2 * MiB + 3)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, "http://127.0.0.1:9", "--allow-registry",
                              origin.url)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}",
                         headers={"X-Dragonfly-Registry": origin.url}) as r:
            assert r.status == 200 and await r.read() == blob
        async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}?ns={origin.host}",
                         headers={"Range": "bytes=10-20"}) as r:
            assert r.status == 206 and await r.read() == blob[10:21]
            assert r.headers["X-Naiad-Source"] == "local"
        async with s.get(f"{peer.url}/v2/?ns={origin.host}") as r:
            assert r.status == 200


async def _naiad(*args: str) -> tuple[int, str]:
    """Run the CLI without blocking this loop (it serves the counting front the peer uses)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_naiad_get_blob_and_plain_url(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    blob = os.urandom(3 * MiB + 7)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    blob_url = f"{origin.url}/v2/{repo}/blobs/{digest}"

    out = tmp_path / "layer.bin"
    rc, text = await _naiad("get", blob_url, "-o", str(out), "--peer", peer.url)
    assert rc == 0, text
    assert out.read_bytes() == blob
    assert not (tmp_path / "layer.bin.part").exists()

    # The same bytes as a plain URL through /download, checked against --digest.
    plain = tmp_path / "plain.bin"
    rc, text = await _naiad("get", blob_url + "?x=1", "-o", str(plain), "--peer", peer.url,
                            "--digest", digest)
    assert rc == 0, text
    assert plain.read_bytes() == blob

    # A wrong --digest: no file, an error.
    bad = tmp_path / "bad.bin"
    wrong = "sha256:" + "1" * 64
    rc, text = await _naiad("get", blob_url + "?x=2", "-o", str(bad), "--peer", peer.url,
                            "--digest", wrong)
    assert rc != 0 and "aborted" in text
    assert not bad.exists() and not (tmp_path / "bad.bin.part").exists()
    # A client's wrong digest condemns nothing: the stored copy still serves the right one.
    good = tmp_path / "good.bin"
    rc, text = await _naiad("get", blob_url + "?x=2", "-o", str(good), "--peer", peer.url,
                            "--digest", digest)
    assert rc == 0 and "source: local" in text, text
    assert good.read_bytes() == blob

    async with aiohttp.ClientSession() as s, s.get(
            f"{peer.url}/download?url={quote('http://evil.example/x', safe='')}") as resp:
        assert resp.status == 403


async def test_naiad_get_shows_progress_on_a_terminal(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    import pty

    blob = os.urandom(2 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", "get", f"{origin.url}/v2/{repo}/blobs/{digest}",
        "-o", str(tmp_path / "out"), "--peer", peer.url, stderr=slave)
    os.close(slave)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    shown = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert b"100.0%" in shown and b"[####" in shown, shown[-300:]
    assert (tmp_path / "out").read_bytes() == blob


async def test_several_registries_through_one_peer(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    """docker's plain mirror (no upstream named: the default registry), nydusd's header and
    containerd's ?ns= for others; the same layer in two registries is one task."""
    other = Registry(tmp_path / "other-registry")
    try:
        await other.ready()
        shared = os.urandom(2 * MiB + 1)
        only_other = os.urandom(MiB + 2)
        digest = await push_blob(registry.url, repo, shared)
        assert await push_blob(other.url, "mirror/copy", shared) == digest
        other_digest = await push_blob(other.url, "mirror/copy", only_other)
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, origin.url, "--allow-registry", other.url)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:  # docker
                assert r.status == 200 and await r.read() == shared
            async with s.get(f"{peer.url}/v2/mirror/copy/blobs/{other_digest}",
                             headers={"X-Dragonfly-Registry": other.url}) as r:  # nydusd
                assert r.status == 200 and await r.read() == only_other
            async with s.get(f"{peer.url}/v2/mirror/copy/blobs/{digest}?ns={other.host}") as r:
                assert r.status == 200 and await r.read() == shared  # containerd
                assert r.headers["X-Naiad-Source"] == "local"
                assert r.headers["X-Naiad-Task-Id"] == digest
            # The other registry's blob is not in the default registry.
            async with s.get(f"{peer.url}/v2/{repo}/blobs/{other_digest}") as r:
                assert r.status == 404
    finally:
        other.stop()
