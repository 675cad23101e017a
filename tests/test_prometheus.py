"""A real Prometheus scrapes a live cluster (a scheduler, three peers) every second while a blob
is distributed; what it then reports — the cluster's saving, the origin bytes, every peer's bytes
by source — is checked against what the registry really sent, counted outside naiad."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import (
    Cluster,
    CountingProxy,
    Node,
    Proc,
    Registry,
    free_port,
    pull_digest,
    push_blob,
    spawn,
    until,
    wait_http,
)

MiB = 1 << 20
# What the registry sends besides blob bytes: status lines and headers of each peer's access
# check (a HEAD) and of the origin GETs, a few hundred bytes each (about 2 KiB in all for the
# pulls below). 16 KiB leaves room for more requests and is far below a second copy of a piece.
HEADER_ALLOWANCE = 16 * 1024
# The saving Prometheus reports against the one computed from the registry's real egress:
# headers make the registry's count slightly larger than the blob bytes peers counted, which
# moves the ratio by HEADER_ALLOWANCE / served at most (< 0.1% here); 1% is the contract.
RATIO_TOLERANCE = 0.01


class Prometheus:
    """Debian's prometheus on a loopback port, scraping the given targets every second."""

    def __init__(self, workdir: Path, scheduler: Node, peers: list[Node]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (.ci/run installs it with apt-get)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text(scrape_config(scheduler, peers))
        self.proc: Proc = spawn("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], workdir)

    async def ready(self) -> None:
        await wait_http(f"{self.url}/-/ready", 60, proc=self.proc)

    async def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": repr(at)} if at is not None else {})
        async with aiohttp.ClientSession() as s, \
                s.get(f"{self.url}/api/v1/query", params=params) as r:
            body = await r.json()
        assert r.status == 200 and body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    async def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = await self.query(expr, at)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.stop()


def _host(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def scrape_config(scheduler: Node, peers: list[Node]) -> str:
    peer_targets = "\n".join(
        f"      - targets: ['{_host(p.url)}']\n        labels: {{peer: '{p.name}'}}"
        for p in peers)
    return f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: naiad-scheduler
    static_configs:
      - targets: ['{_host(scheduler.url)}']
  - job_name: naiad-peer
    static_configs:
{peer_targets}
"""


@pytest.fixture
async def cluster3(cluster: Cluster, origin: CountingProxy) -> tuple[Node, list[Node]]:
    sched = await cluster.scheduler()
    peers = await asyncio.gather(*(cluster.peer(f"prom-peer-{i}", sched.url, origin.url)
                                   for i in range(3)))
    return sched, list(peers)


@pytest.fixture
async def prometheus(tmp_path: Path, cluster3: tuple[Node, list[Node]]):
    sched, peers = cluster3
    prom = Prometheus(tmp_path / "prometheus", sched, peers)
    try:
        await prom.ready()
        yield prom
    finally:
        prom.stop()


async def test_prometheus_reports_the_saving_the_registry_really_saw(
        cluster3: tuple[Node, list[Node]], prometheus: Prometheus, registry: Registry,
        origin: CountingProxy, repo: str) -> None:
    _, peers = cluster3

    async def all_targets_up() -> bool:
        up = await prometheus.query("up")
        return len(up) == 4 and all(s["value"][1] == "1" for s in up)
    await until(all_targets_up, 30, "Prometheus scraping the scheduler and three peers")

    blob = os.urandom(8 * MiB + 4321)
    digest = await push_blob(registry.url, repo, blob)
    before = origin.bytes_down
    for p in peers:  # one after another: the first pays the origin, the others get it from peers
        assert await pull_digest(f"{p.url}/v2/{repo}/blobs/{digest}") == digest
    registry_bytes = origin.bytes_down - before
    served = 3 * len(blob)

    # Readiness: the peers' heartbeats have reached the scheduler and Prometheus has scraped it.
    at: float | None = None

    async def scraped_everything() -> bool:
        nonlocal at
        result = await prometheus.query("naiad_cluster_served_bytes_total")
        peers_served = await prometheus.scalar("sum(naiad_peer_served_bytes_total)")
        if result and float(result[0]["value"][1]) == served and peers_served == served:
            at = float(result[0]["value"][0])
            return True
        return False
    await until(scraped_everything, 30, "Prometheus seeing every served byte")

    # Every figure below from one evaluation instant: one scrape of each target.
    saving = await prometheus.scalar("naiad_cluster_backbone_savings_ratio", at)
    origin_series = await prometheus.query('naiad_cluster_download_bytes_total{source="origin"}',
                                           at)
    per_peer = await prometheus.query("naiad_peer_download_bytes_total", at)
    assert saving is not None and len(origin_series) == 1, (saving, origin_series)
    cluster_origin = float(origin_series[0]["value"][1])

    # The origin bytes the cluster reports are the bytes the registry sent, less headers.
    assert len(blob) <= cluster_origin <= registry_bytes, (cluster_origin, registry_bytes)
    assert registry_bytes - cluster_origin <= HEADER_ALLOWANCE, (registry_bytes, cluster_origin)
    # Sequential pulls fetch the blob from the registry exactly once.
    assert cluster_origin == len(blob)

    # The saving Prometheus reports is the one the registry's egress shows.
    real_saving = 1 - registry_bytes / served
    assert abs(saving - real_saving) <= RATIO_TOLERANCE, (saving, real_saving)
    assert saving == pytest.approx(1 - len(blob) / served, abs=1e-9)
    assert saving == pytest.approx(2 / 3, abs=RATIO_TOLERANCE)

    # Per peer: three series each (origin, peer, local); each peer obtained the blob once, and
    # the peers' own origin counts add up to the cluster's.
    by_peer: dict[str, dict[str, float]] = {}
    for series in per_peer:
        labels = series["metric"]
        by_peer.setdefault(labels["peer"], {})[labels["source"]] = float(series["value"][1])
    assert set(by_peer) == {p.name for p in peers}, by_peer
    for name, sources in by_peer.items():
        assert set(sources) == {"origin", "peer", "local"}, (name, sources)
        assert sum(sources.values()) == len(blob), (name, sources)
    assert sum(s["origin"] for s in by_peer.values()) == cluster_origin
    assert sum(s["peer"] for s in by_peer.values()) == 2 * len(blob)
