"""`--origin-rate`, `--download-rate`, `--upload-rate`: token buckets on the peer's links.
A limited transfer can be slower than its rate on a busy machine, never faster, so each test
asserts a lower bound on the time a pull takes (less the one-second burst) and exact bytes."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from common.limits import Paced, TokenBucket
from tests.cluster import Cluster, CountingProxy, Registry, metric, pull_digest, push_blob

MiB = 1 << 20


class _Bytes:
    def __init__(self, total: int, part: int) -> None:
        self.left, self.part = total, part

    async def read(self, n: int = -1) -> bytes:
        size = min(self.left, self.part if n < 0 else min(n, self.part))
        self.left -= size
        return b"x" * size


async def test_paced_reads_keep_to_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:  # time passes only when the bucket waits
        slept.append(seconds)
        clock[0] += seconds
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    stream = Paced(_Bytes(5000, 500), TokenBucket(1000, clock=lambda: clock[0]))
    got = 0
    while data := await stream.read():
        got += len(data)
    assert got == 5000
    # 5,000 bytes at 1,000/s with a one-second burst: 4 s of waiting, never less.
    assert sum(slept) == pytest.approx(4.0)
    assert await Paced(_Bytes(10, 10), None).read() == b"x" * 10  # unlimited


async def _timed_pull(url: str) -> tuple[str, float]:
    started = time.monotonic()
    digest = await pull_digest(url)
    return digest, time.monotonic() - started


async def test_origin_rate_limits_the_registry_link(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(6 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url, "--origin-rate", "2MiB")
    got, took = await _timed_pull(f"{peer.url}/v2/{repo}/blobs/{digest}")
    assert got == digest
    assert took >= (6 - 2) / 2 * 0.95, took  # 6 MiB at 2 MiB/s, less a 2 MiB burst


@pytest.mark.parametrize("side", ["upload", "download"])
async def test_peer_rates_limit_the_peer_link(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        side: str) -> None:
    blob = os.urandom(6 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a = await cluster.peer("a", sched.url, origin.url,
                           *(["--upload-rate", "2MiB"] if side == "upload" else []))
    assert await pull_digest(f"{a.url}/v2/{repo}/blobs/{digest}") == digest
    b = await cluster.peer("b", sched.url, origin.url,
                           *(["--download-rate", "2MiB"] if side == "download" else []))
    got, took = await _timed_pull(f"{b.url}/v2/{repo}/blobs/{digest}")
    assert got == digest
    assert await metric(b.url, "naiad_peer_download_bytes_total",
                        {"source": "peer"}) == len(blob)
    assert took >= (6 - 2) / 2 * 0.95, took
