"""Private registries through the mirror: Basic and Bearer challenges pass through unchanged,
authorised clients pull peer-to-peer, and no blob leaks past the registry's access control —
not from a peer's store, not from other peers, not by naming another repository."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import Cluster, CountingProxy, Registry, metric, push_blob
from tests.nydus import Nydus
from tests.registry_auth import (
    SERVICE,
    TokenServer,
    basic,
    htpasswd_yaml,
    write_htpasswd,
)

MiB = 1 << 20


async def _get(url: str, headers: dict[str, str] | None = None,
               **kw: object) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}, **kw) as r:
        return r.status, dict(r.headers), await r.read()


async def test_basic_auth_passes_through_and_gates_cached_blobs(
        cluster: Cluster, tmp_path: Path) -> None:
    users = {"alice": "wonderland", "admin": "s3cret"}
    registry = Registry(tmp_path / "registry",
                        auth_yaml=htpasswd_yaml(write_htpasswd(tmp_path / "htpasswd", users)))
    front = CountingProxy(registry.port)
    try:
        await registry.ready()
        await front.start()
        blob = os.urandom(3 * MiB + 1)
        digest = await push_blob(registry.url, "team/app", blob,
                                 headers={"Authorization": basic("admin", "s3cret")})
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, front.url)
        url = f"{peer.url}/v2/team/app/blobs/{digest}"

        status, _, body = await _get(url, {"Authorization": basic("alice", "wonderland")})
        assert (status, body) == (200, blob)
        served = await metric(peer.url, "naiad_peer_served_bytes_total")
        # The blob is in the peer's store now; without credentials, or with wrong ones, the
        # client gets the registry's own challenge and no byte.
        for headers in ({}, {"Authorization": basic("alice", "wrong")}):
            status, h, body = await _get(url, headers)
            assert status == 401
            assert h["WWW-Authenticate"] == 'Basic realm="basic-realm"'
            assert blob[:64] not in body
        status, h, _ = await _get(f"{peer.url}/v2/", {})
        assert status == 401 and h["WWW-Authenticate"].startswith("Basic")
        assert await metric(peer.url, "naiad_peer_served_bytes_total") == served
    finally:
        await front.stop()
        registry.stop()


@pytest.fixture
async def token_registry(tmp_path: Path) -> AsyncIterator[tuple[TokenServer, Registry,
                                                                 CountingProxy]]:
    tokens = TokenServer(
        tmp_path, users={"alice": "a-pass", "bob": "b-pass", "admin": "root"},
        grants={"admin": {"*": ["pull", "push"]},
                "alice": {"private/*": ["pull"], "public/*": ["pull"]},
                "bob": {"public/*": ["pull"]},
                None: {"public/*": ["pull"]}})
    await tokens.start()
    registry = Registry(tmp_path / "registry", auth_yaml=tokens.registry_yaml())
    front = CountingProxy(registry.port)
    try:
        await registry.ready()
        await front.start()
        yield tokens, registry, front
    finally:
        await front.stop()
        registry.stop()
        await tokens.stop()


def _bearer(tokens: TokenServer, user: str | None, repo: str, actions: str = "pull") -> dict:
    return {"Authorization": "Bearer " + tokens.issue(user, [f"repository:{repo}:{actions}"])}


async def test_token_auth_never_leaks_a_private_blob(
        cluster: Cluster, token_registry: tuple[TokenServer, Registry, CountingProxy]) -> None:
    tokens, registry, front = token_registry
    secret = os.urandom(8 * MiB + 3)
    digest = await push_blob(registry.url, "private/app", secret,
                             headers=_bearer(tokens, "admin", "private/app", "pull,push"))
    await push_blob(registry.url, "public/app", os.urandom(1000),
                    headers=_bearer(tokens, "admin", "public/app", "pull,push"))
    sched = await cluster.scheduler()
    a, b = await asyncio.gather(cluster.peer("a", sched.url, front.url),
                                cluster.peer("b", sched.url, front.url))

    # Alice does nydusd's token dance through the mirror (the realm answers her directly).
    alice = Nydus(front.url, "private/app", digest, len(secret), mirror=a.url,
                  mirror_headers={"X-Dragonfly-Registry": front.url},
                  username="alice", password="a-pass")
    async with aiohttp.ClientSession() as session:
        await alice.run(session, secret)
    assert tokens.requests >= 1
    status, _, body = await _get(f"{a.url}/v2/private/app/blobs/{digest}",
                                 _bearer(tokens, "alice", "private/app"))
    assert (status, body) == (200, secret)

    served = {p.name: await metric(p.url, "naiad_peer_served_bytes_total") for p in (a, b)}
    got_b = await metric(b.url, "naiad_peer_download_bytes_total", {"source": "peer"})
    for peer in (a, b):
        private = f"{peer.url}/v2/private/app/blobs/{digest}"
        # Anonymous: the registry's Bearer challenge, unchanged.
        status, h, body = await _get(private)
        assert status == 401, peer.name
        assert h["WWW-Authenticate"].startswith(f'Bearer realm="{tokens.url}/token"')
        assert f'service="{SERVICE}"' in h["WWW-Authenticate"]
        assert "repository:private/app:pull" in h["WWW-Authenticate"]
        assert secret[:64] not in body
        # Bob holds a valid token that grants nothing on the private repository.
        status, _, body = await _get(private, _bearer(tokens, "bob", "private/app"))
        assert status == 401 and secret[:64] not in body
        # Bob names a public repository for the private digest: the registry's answer for that
        # repository (the blob is unknown there), never the bytes a peer holds.
        status, _, body = await _get(f"{peer.url}/v2/public/app/blobs/{digest}",
                                     _bearer(tokens, "bob", "public/app"))
        assert status == 404 and b"BLOB_UNKNOWN" in body
        # A ranged read changes nothing.
        status, _, body = await _get(private, {**_bearer(tokens, "bob", "private/app"),
                                               "Range": "bytes=0-1023"})
        assert status == 401 and secret[:64] not in body
    for peer in (a, b):
        assert await metric(peer.url, "naiad_peer_served_bytes_total") == served[peer.name]
    assert await metric(b.url, "naiad_peer_download_bytes_total",
                        {"source": "peer"}) == got_b, "b fetched the blob for bob"

    # Alice through b: authorised, so b fetches from a, and the registry sends no blob bytes.
    before = front.bytes_down
    status, _, body = await _get(f"{b.url}/v2/private/app/blobs/{digest}",
                                 _bearer(tokens, "alice", "private/app"))
    assert (status, body) == (200, secret)
    assert front.bytes_down - before < 64 * 1024, "only access checks may reach the registry"


async def test_token_realm_through_the_proxy(
        cluster: Cluster, token_registry: tuple[TokenServer, Registry, CountingProxy]) -> None:
    """nydusd in proxy mode reaches the token realm through the peer too (the realm's host is
    on the allow-list)."""
    tokens, registry, front = token_registry
    blob = os.urandom(2 * MiB + 9)
    digest = await push_blob(registry.url, "private/tool", blob,
                             headers=_bearer(tokens, "admin", "private/tool", "pull,push"))
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, front.url, "--allow-registry", tokens.url)
    before = tokens.requests
    client = Nydus(front.url, "private/tool", digest, len(blob), proxy=peer.url,
                   username="alice", password="a-pass")
    async with aiohttp.ClientSession() as session:
        await client.run(session, blob)
    assert tokens.requests > before
    # The realm's host must be allow-listed: another host's realm is refused.
    status, _, _ = await _get(f"http://127.0.0.1:{tokens.port + 1}/token", proxy=peer.url)
    assert status == 403
