"""Chaos during a distribution: eight peers pull one blob at once while three are SIGKILLed at
random moments, one fake peer serves corrupt chunks under true chunk ids, and the scheduler is
killed and restarted (in memory: peers register and announce again). Every surviving client
gets the exact blob in one pull and no client ever receives a wrong byte.

bench/chaos.py runs the same scenario over many seeds and longer blobs."""

from __future__ import annotations

import asyncio
import os
import random

import aiohttp

from tests.cluster import Cluster, CountingProxy, Node, Registry, metric, push_blob
from tests.faults import CorruptParent

MiB = 1 << 20
SEED = int(os.environ.get("NAIAD_CHAOS_SEED", "20261128"))


class WrongByte(AssertionError):
    pass


async def _client(peer: Node, url: str, blob: bytes) -> str:
    """Pull the whole blob, checking every byte as it arrives; "ok", or why it stopped."""
    offset = 0
    try:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            if r.status != 200:
                return f"status {r.status}"
            async for chunk in r.content.iter_chunked(256 << 10):
                if chunk != blob[offset:offset + len(chunk)]:
                    raise WrongByte(f"{peer.name} received a wrong byte near {offset}")
                offset += len(chunk)
    except (aiohttp.ClientError, ConnectionError) as e:
        return f"broken after {offset} bytes: {e!r}"
    return "ok" if offset == len(blob) else f"short: {offset} bytes"


async def run_chaos(cluster: Cluster, registry_url: str, front: CountingProxy, repo: str,
                    blob: bytes, digest: str, seed: int, peers: int = 8,
                    kills: int = 3) -> dict:
    rng = random.Random(seed)
    sched = await cluster.scheduler()
    nodes = await asyncio.gather(*(cluster.peer(f"peer{i}", sched.url, front.url)
                                   for i in range(peers)))
    victims = rng.sample(nodes, kills)
    kill_at = sorted(rng.uniform(0.05, 1.0) for _ in victims)
    restart_at = rng.uniform(0.1, 0.8)
    before = front.bytes_down
    events: list[str] = []

    async with CorruptParent(sched.url, blob, digest) as corrupt:
        async def chaos() -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            plan = [(t, "kill", v) for t, v in zip(kill_at, victims, strict=True)]
            plan.append((restart_at, "restart", sched))
            for at, what, node in sorted(plan, key=lambda p: p[0]):
                await asyncio.sleep(max(0.0, at - (loop.time() - start)))
                node.proc.kill()
                events.append(f"{loop.time() - start:.2f}s {what} {node.name}")
                if what == "restart":
                    fresh = await cluster.scheduler(port=node.extra["port"])
                    events.append(f"{loop.time() - start:.2f}s scheduler back")
                    cluster.nodes.remove(fresh)  # one node per role, now with the new process
                    node.proc = fresh.proc

        url = f"/v2/{repo}/blobs/{digest}"
        results = await asyncio.gather(chaos(), *(_client(n, n.url + url, blob) for n in nodes))
        corrupt_served = corrupt.requests
    outcome = dict(zip((n.name for n in nodes), results[1:], strict=True))
    survivors = [n for n in nodes if n not in victims]
    failures = {n.name: outcome[n.name] for n in survivors if outcome[n.name] != "ok"}
    verify = sum([await metric(n.url, "naiad_peer_verify_failures_total") for n in survivors])
    return {"seed": seed, "events": events, "outcome": outcome, "failures": failures,
            "origin_multiple": (front.bytes_down - before) / len(blob),
            "corrupt_requests": corrupt_served, "verify_failures": verify,
            "victims": [v.name for v in victims]}


async def test_chaos_eight_peers_three_killed_one_corrupt_scheduler_restarted(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(32 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    report = await run_chaos(cluster, registry.url, origin, repo, blob, digest, SEED)
    print(report)
    assert not report["failures"], report
    # The corrupt fake was asked for chunks and every such chunk was caught on arrival.
    assert report["corrupt_requests"] == 0 or report["verify_failures"] >= 1, report
    # Bounded origin egress (direct pulls would be 8x); the figure goes to docs/reliability.md.
    assert report["origin_multiple"] < 4.0, report
