"""Transport versions through a rolling upgrade: peers register the transports they speak, the
scheduler hands each child a parent with the highest transport both speak, and what it tells a
child before transport 2 is exactly what such a child accepts. End to end: two real peers move a
blob over the framed transport; a parent that speaks only HTTP (v1) still serves a v2 child."""

from __future__ import annotations

import os
import random

from aiohttp import web

from common import ids
from common.models import (
    Announce,
    Decision,
    PeerRegistration,
    PieceClaim,
    ScheduleRequest,
    TaskRequest,
)
from common.pieces import MiB
from scheduler.state import ClusterState
from tests.cluster import Cluster, CountingProxy, Registry, metric, pull_digest, push_blob
from tests.faults import CorruptParent

TASK = f"sha256:{7:064x}"


def _decide(transports: dict[str, int]) -> dict[str, Decision]:
    """Each peer's decision for piece 0 of a task the peer "parent" holds, every peer
    registered with the transport given (None: a registration before the field); each asks
    alone, as the parent's first child (it has room for one: CHILDREN_PER_HOLDER)."""
    return {pid: _first_child(transports, pid)
            for pid in transports if pid != "parent"}


def _first_child(transports: dict[str, int], child: str) -> Decision:
    s = ClusterState(heartbeat_interval=1.0, lease_timeout=5.0, rng=random.Random(0))
    for n, (pid, transport) in enumerate(transports.items()):
        fields = {"transport": transport} if transport else {}
        s.register(PeerRegistration(id=pid, upload_addr=f"10.0.0.{n + 1}:65002", **fields),
                   0.0)
    s.ensure_task(TaskRequest(task_id=TASK, length=MiB, piece_size=MiB), 0.0)
    s.announce(Announce(peer_id="parent", task_id=TASK,
                        pieces=[PieceClaim(index=0, chunk=f"blake3:{1:064x}")]), 0.0)
    return s.schedule(ScheduleRequest(peer_id=child, task_id=TASK, pieces=[0]), 0.0)[0]


def test_the_scheduler_hands_out_the_transport_both_speak() -> None:
    new_parent = _decide({"parent": 2, "new": 2, "old": 0})
    assert [p.transport for p in new_parent["new"].parents] == [2]
    assert [p.transport for p in new_parent["old"].parents] == [1]
    # What an old child receives has no field it would refuse (its models forbid extras).
    assert "transport" not in new_parent["old"].model_dump_json()
    assert '"transport":2' in new_parent["new"].model_dump_json()
    old_parent = _decide({"parent": 0, "new": 2})
    assert [p.transport for p in old_parent["new"].parents] == [1]


async def test_two_peers_move_a_blob_over_the_framed_transport(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(24 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    a = await cluster.peer("peer-a", sched.url, origin.url, "--log-level", "debug")
    b = await cluster.peer("peer-b", sched.url, origin.url)
    assert await pull_digest(f"{a.url}/v2/{repo}/blobs/{digest}") == digest
    before = origin.bytes_down
    assert await pull_digest(f"{b.url}/v2/{repo}/blobs/{digest}") == digest
    assert origin.bytes_down - before < MiB  # the manifest-free blob came from peer-a
    assert await metric(b.url, "naiad_peer_download_bytes_total",
                        {"source": "peer"}) == len(blob)
    assert await metric(a.url, "naiad_peer_upload_bytes_total") >= len(blob)
    logs = a.proc.logs()
    assert logs.count("(framed)") == 24, logs[-3000:]


class HttpOnlyParent(CorruptParent):
    """A parent from before the framed transport: it registers no transport and serves
    chunks over HTTP only, honestly."""

    async def _chunk(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(body=self.chunks[request.match_info["chunk"]])


async def test_a_v2_child_pulls_from_a_v1_parent(cluster: Cluster, registry: Registry,
                                                 origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(8 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    async with HttpOnlyParent(sched.url, blob, digest) as old:
        child = await cluster.peer("child", sched.url, origin.url)
        before = origin.bytes_down
        assert await pull_digest(f"{child.url}/v2/{repo}/blobs/{digest}") == digest
        assert old.requests == old.layout.count  # every piece over HTTP from the old parent
        assert origin.bytes_down - before < MiB
    assert ids.chunk_id(blob[:old.layout.span(0)[1]]) in old.chunks
