"""nydusd's lazy reads, emulated byte for byte (tests/nydus.py), against a real registry
through naiad peers in proxy mode (today's nydusd) and in the mirror mode nydusd had before
July 2025. The proxy headers' own rules: tests/test_nydus_proxy.py."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    metric,
    push_blob,
    self_signed_cert,
    until,
)
from tests.nydus import Nydus

MiB = 1 << 20


@pytest.mark.parametrize("mode", ["proxy", "mirror"])
async def test_nydusd_reads_through_three_peers(
        mode: str, cluster: Cluster, registry: Registry, origin: CountingProxy,
        repo: str) -> None:
    blob = os.urandom(64 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peers = await asyncio.gather(*(
        cluster.peer(f"{mode}{i}", sched.url, "https://registry.invalid",
                     "--allow-registry", origin.url) for i in range(3)))
    before = origin.bytes_down
    clients = []
    for p in peers:
        if mode == "mirror":
            clients.append(Nydus(origin.url, repo, digest, len(blob), mirror=p.url,
                                 mirror_headers={"X-Dragonfly-Registry": origin.url}))
        else:
            clients.append(Nydus(origin.url, repo, digest, len(blob), proxy=p.url,
                                 ping_url=f"{p.url}/healthy"))
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(c.run(session, blob, seed=i) for i, c in enumerate(clients)))

    for c in clients:
        assert c.fallbacks == 0, "a read fell back from the peer to the registry"
        assert (c.limited, c.direct, c.abandoned) == (0, 0, 0), "the peer said 429"
        slowest = max(r.seconds for r in c.reads)
        assert slowest < 5.0, f"a read took {slowest:.2f} s"
        assert len(c.reads) > 40
    sent = origin.bytes_down - before
    print(f"{mode}: slowest read {max(r.seconds for c in clients for r in c.reads):.2f} s, "
          f"registry sent {sent / len(blob):.3f}x the blob")
    assert sent <= 1.1 * len(blob), f"registry sent {sent / len(blob):.2f}x the blob"
    # The reads went peer-to-peer: the peers got more from each other than from the registry.
    from_peers = sum([await metric(p.url, "naiad_peer_download_bytes_total",
                                   {"source": "peer"}) for p in peers])
    assert from_peers > 0


async def test_proxy_mode_reaches_an_https_registry(
        cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, repo: str) -> None:
    """nydusd's `use_http` sends `GET http://registry/...` to the proxy; the allow-list says the
    registry is https, so the peer fetches over TLS. Without `use_http` the client sends
    CONNECT, which is tunnelled (no P2P) to allow-listed hosts only."""
    import ssl

    workdir = tmp_path_factory.mktemp("tls-registry")
    cert, key = self_signed_cert(workdir)
    registry = Registry(workdir / "registry", tls=(cert, key))
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        await registry.ready(ssl=trust)
        blob = os.urandom(6 * MiB + 11)
        digest = await push_blob(registry.url, repo, blob, ssl=trust)
        sched = await cluster.scheduler()
        peer = await cluster.peer("tls", sched.url, registry.url,
                                  env={"SSL_CERT_FILE": str(cert)})
        async with aiohttp.ClientSession() as session:
            plain = Nydus(registry.url, repo, digest, len(blob), proxy=peer.url)
            assert plain._url().startswith("http://")
            await plain.run(session, blob, seed=3)
            assert await metric(peer.url, "naiad_peer_served_bytes_total") > 0

            served = await metric(peer.url, "naiad_peer_served_bytes_total")
            tunnelled = Nydus(registry.url, repo, digest, len(blob), proxy=peer.url,
                              use_http=False, ssl=trust)
            assert await tunnelled.read(session, 1000, 5000) == blob[1000:6000]
            assert await metric(peer.url, "naiad_peer_served_bytes_total") == served

        # CONNECT anywhere else is refused.
        for target in ("evil.example:443", f"127.0.0.1:{registry.port + 1}", "127.0.0.1:22"):
            reader, writer = await asyncio.open_connection("127.0.0.1",
                                                           int(peer.url.rsplit(":", 1)[1]))
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            status = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert status.startswith(b"HTTP/1.1 403"), (target, status)
    finally:
        registry.stop()


async def test_cold_range_read_fetches_only_its_pieces_then_prefetch_fills_in(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(32 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    lazy, eager = await asyncio.gather(
        cluster.peer("lazy", sched.url, origin.url, "--no-prefetch"),
        cluster.peer("eager", sched.url, origin.url))
    headers = {"Range": "bytes=10000000-10131071", "X-Dragonfly-Priority": "6"}
    async with aiohttp.ClientSession() as s:
        before = origin.bytes_down
        async with s.get(f"{lazy.url}/v2/{repo}/blobs/{digest}", headers=headers) as r:
            assert await r.read() == blob[10000000:10131072]
        # One 1 MiB piece covers the read: the registry sent that, not the blob.
        assert origin.bytes_down - before <= 1 * MiB + 64 * 1024

        async with s.get(f"{eager.url}/v2/{repo}/blobs/{digest}",
                         headers={"Range": "bytes=20000000-20000099"}) as r:
            assert await r.read() == blob[20000000:20000100]

    async def eager_holds_everything() -> bool:
        async with member_session() as s, \
                s.get(f"{sched.url}/api/v1/tasks/{digest}") as r:
            task = await r.json()
        return sum("eager" in p["holders"] for p in task["piece_map"]) == task["pieces"]
    await until(eager_holds_everything, 30, "background prefetch of the whole blob")
    # Prefetch went through the scheduler: the piece the lazy peer held came from it.
    assert origin.bytes_down - before <= 1.05 * len(blob) + 64 * 1024
