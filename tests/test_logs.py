"""Structured logs: one JSON object per line, and a pull's request id on the lines of every
hop it touches: the mirror that served it, the scheduler it asked, the parent it fetched from."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp

from tests.cluster import Cluster, CountingProxy, Node, Registry, push_blob, until

MiB = 1 << 20


def _records(node: Node) -> list[dict]:
    out = []
    for line in node.proc.logs().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_json_logs_carry_the_request_id_across_hops(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(3 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    json_logs = ("--log-format", "json", "--log-level", "debug")
    sched = await cluster.scheduler(*json_logs)
    a, b = await asyncio.gather(*(cluster.peer(n, sched.url, origin.url, *json_logs)
                                  for n in ("a", "b")))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a.url}/v2/{repo}/blobs/{digest}") as r:
            assert await r.read() == blob
        async with s.get(f"{b.url}/v2/{repo}/blobs/{digest}",
                         headers={"X-Request-Id": "pull-42"}) as r:
            assert await r.read() == blob
            assert r.headers["X-Request-Id"] == "pull-42"
        async with s.get(f"{b.url}/healthy", headers={"X-Request-Id": "bad id!"}) as r:
            assert r.headers["X-Request-Id"] != "bad id!"  # not adopted: ours instead

    def tagged(node: Node) -> list[dict]:
        return [r for r in _records(node) if r.get("request_id") == "pull-42"]

    async def all_hops_logged() -> bool:
        return bool(tagged(b) and tagged(sched) and tagged(a))
    await until(all_hops_logged, 10, "the request id on every hop")
    assert any("served" in r["msg"] for r in tagged(b))
    assert any(r["msg"].startswith("schedule") for r in tagged(sched))
    assert any(r["msg"].startswith("uploaded") for r in tagged(a))
    for node in (a, b, sched):
        for record in _records(node):
            assert {"ts", "level", "logger", "msg"} <= record.keys()
