"""Byte-exact ranges through a peer: unaligned, open-ended, suffix, across pieces; cold (the
peer holds nothing yet, reads run concurrently) and warm (everything stored)."""

from __future__ import annotations

import asyncio
import os
import random

import aiohttp
import pytest

from tests.cluster import Cluster, CountingProxy, Registry, push_blob

MiB = 1 << 20


def _cases(length: int, rng: random.Random) -> list[tuple[str, int, int]]:
    """(Range header, first byte, last byte) covering every form and boundary."""
    p = MiB
    cases = [
        (f"bytes=0-{length - 1}", 0, length - 1),
        ("bytes=0-0", 0, 0),
        (f"bytes={length - 1}-", length - 1, length - 1),
        (f"bytes={p - 1}-{p}", p - 1, p),  # the two sides of a piece boundary
        (f"bytes={p}-{2 * p - 1}", p, 2 * p - 1),  # exactly one piece
        (f"bytes={p - 7}-{3 * p + 11}", p - 7, 3 * p + 11),  # spans four pieces
        (f"bytes={length - 100}-{length + 5000}", length - 100, length - 1),  # clipped end
        ("bytes=-1", length - 1, length - 1),
        (f"bytes=-{p + 3}", length - p - 3, length - 1),
        (f"bytes=-{length + 10}", 0, length - 1),  # suffix longer than the blob
        (f"bytes={3 * p + 5}-", 3 * p + 5, length - 1),
    ]
    for _ in range(12):
        a = rng.randrange(length)
        b = rng.randrange(a, min(length, a + 3 * p))
        cases.append((f"bytes={a}-{b}", a, b))
    return cases


async def _read(session: aiohttp.ClientSession, url: str, header: str) -> tuple[int, dict, bytes]:
    async with session.get(url, headers={"Range": header}) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.mark.parametrize("verify", ["verify-on-serve", "no-verify-on-serve"])
async def test_random_ranges_are_byte_exact_cold_and_warm(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        verify: str) -> None:
    """Warm reads of a sealed blob without verification go out by sendfile from the chunk
    files; with it, through the re-hashing reader: both byte-exact."""
    flags = ("--no-verify-on-serve",) if verify == "no-verify-on-serve" else ()
    rng = random.Random(7)
    length = 6 * MiB + 12345
    blob = os.urandom(length)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    cold, other = await asyncio.gather(cluster.peer("cold", sched.url, origin.url, *flags),
                                       cluster.peer("other", sched.url, origin.url, *flags))
    cases = _cases(length, rng)

    async with aiohttp.ClientSession() as s:
        url = f"{cold.url}/v2/{repo}/blobs/{digest}"
        # Cold: every read at once on a peer that holds nothing.
        answers = await asyncio.gather(*(_read(s, url, h) for h, _, _ in cases))
        for (header, a, b), (status, headers, body) in zip(cases, answers, strict=True):
            assert status == 206, (header, status, body[:200])
            assert headers["Content-Range"] == f"bytes {a}-{b}/{length}", header
            assert int(headers["Content-Length"]) == b - a + 1
            assert body == blob[a:b + 1], header
        # Warm: the same reads, now from the store; and through a second peer, from the first.
        for peer in (cold, other):
            url = f"{peer.url}/v2/{repo}/blobs/{digest}"
            for header, a, b in cases:
                status, headers, body = await _read(s, url, header)
                assert (status, body) == (206, blob[a:b + 1]), (peer.name, header)
        status, headers, _ = await _read(s, f"{cold.url}/v2/{repo}/blobs/{digest}", "bytes=0-9")
        assert headers["X-Naiad-Source"] == "local"
        for peer in (cold, other):  # and whole, without a Range
            async with s.get(f"{peer.url}/v2/{repo}/blobs/{digest}") as r:
                assert r.status == 200 and await r.read() == blob


async def test_unsatisfiable_and_malformed_ranges(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(MiB + 1)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url)
    url = f"{peer.url}/v2/{repo}/blobs/{digest}"
    async with aiohttp.ClientSession() as s:
        for header in (f"bytes={len(blob)}-", f"bytes={len(blob) + 10}-{len(blob) + 20}",
                       "bytes=-0"):
            status, headers, _ = await _read(s, url, header)
            assert status == 416, header
            assert headers["Content-Range"] == f"bytes */{len(blob)}"
        for header in ("bytes=5-2", "items=0-1", "bytes=0-1,5-6", "bytes=x-y", "bytes=-"):
            status, _, body = await _read(s, url, header)
            assert status == 400, header
            assert b"range" in body.lower()
        # Nothing was fetched for refused requests.
        status, headers, body = await _read(s, url, "bytes=0-")
        assert status == 206 and body == blob
