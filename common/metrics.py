"""Prometheus metrics, with the names DESIGN.md fixes. Each server owns its own registry, so
several peers in one process (the demo, the tests) never mix their counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SOURCES = ("origin", "peer", "local")
PIECE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def restarts_counter(registry: CollectorRegistry | None) -> Counter:
    """`naiad_background_restarts_total{loop}`, for `TaskSet(restarts=...)`; with no registry
    yet (the scheduler's store is made before its API), register it later."""
    return Counter("naiad_background_restarts",
                   "Background loops restarted after a failure, by loop.", ["loop"],
                   registry=registry)


class PeerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.download_bytes = Counter(
            "naiad_peer_download_bytes", "Bytes this peer obtained for its clients, by source.",
            ["source"], registry=r)
        self.upload_bytes = Counter("naiad_peer_upload_bytes", "Bytes served to other peers.",
                                    registry=r)
        self.served_bytes = Counter("naiad_peer_served_bytes", "Bytes served to clients.",
                                    registry=r)
        self.piece_seconds = Histogram("naiad_peer_piece_seconds",
                                       "Time to obtain one piece, by source.", ["source"],
                                       buckets=PIECE_BUCKETS, registry=r)
        self.verify_failures = Counter(
            "naiad_peer_verify_failures", "Pieces or blobs whose digest did not match.",
            registry=r)
        self.tasks_active = Gauge("naiad_peer_tasks_active", "Tasks with a transfer in flight.",
                                  registry=r)
        self.cache_bytes = Gauge("naiad_peer_cache_bytes", "Bytes of chunks in the store.",
                                 registry=r)
        self.own_failures = Counter(
            "naiad_peer_proxy_errors",
            "Answers that were the peer's own failure (X-Dragonfly-Error-Type: proxy; 429: an "
            "on-demand read sent back to the registry), by status.", ["status"], registry=r)
        self.restarts = restarts_counter(r)
        for s in SOURCES:
            self.download_bytes.labels(s)
            self.piece_seconds.labels(s)
        # The statuses a peer's own failures usually have, exported at 0 from the start so a
        # dashboard's rate() has a series before the first failure.
        for status in ("429", "502", "503", "504"):
            self.own_failures.labels(status)


class _ClusterCollector(Collector):
    """Cluster-wide counters computed from the peers' reports at scrape time."""

    def __init__(self, counters: Callable[[], dict[str, int]],
                 ratio: Callable[[], float]) -> None:
        self._counters = counters
        self._ratio = ratio

    def collect(self) -> Iterator[Metric]:
        c = self._counters()
        fam = CounterMetricFamily("naiad_cluster_download_bytes",
                                  "Bytes peers obtained for clients, cluster-wide, by source.",
                                  labels=["source"])
        for s in SOURCES:
            fam.add_metric([s], c[s])
        yield fam
        yield CounterMetricFamily("naiad_cluster_served_bytes",
                                  "Bytes peers served to clients, cluster-wide.",
                                  value=c["served"])
        yield GaugeMetricFamily("naiad_cluster_backbone_savings_ratio",
                                "1 - origin bytes / bytes served to clients, cluster-wide.",
                                value=self._ratio())


class SchedulerMetrics:
    def __init__(self, counters: Callable[[], dict[str, int]],
                 ratio: Callable[[], float]) -> None:
        self.registry = r = CollectorRegistry()
        self.peers = Gauge("naiad_scheduler_peers", "Live peers.", registry=r)
        self.tasks = Gauge("naiad_scheduler_tasks", "Known tasks.", registry=r)
        self.schedule_seconds = Histogram("naiad_scheduler_schedule_seconds",
                                          "Time to decide one schedule request.",
                                          buckets=PIECE_BUCKETS, registry=r)
        self.back_to_source = Counter("naiad_scheduler_back_to_source",
                                      "Origin leases granted.", registry=r)
        self.heartbeats = Counter("naiad_scheduler_heartbeats",
                                  "Peer heartbeats received, by transport and outcome "
                                  "(accepted, unknown peer, dropped as malformed or forged).",
                                  ["transport", "result"], registry=r)
        for transport in ("udp", "http"):
            for result in ("accepted", "unknown", "dropped"):
                self.heartbeats.labels(transport, result)  # present, at 0, from the start
        r.register(_ClusterCollector(counters, ratio))


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], object]:
    async def handler(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(registry))
        resp.content_type = "text/plain"
        resp.charset = "utf-8"
        return resp
    return handler
