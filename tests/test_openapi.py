"""The OpenAPI document matches the live scheduler: every route is documented, and real
responses validate against the schemas it gives."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import jsonschema
from referencing import Registry as SchemaRegistry
from referencing import Resource
from referencing.jsonschema import DRAFT202012

from scheduler.api import SchedulerAPI
from scheduler.openapi import document
from scheduler.store import MemoryStore
from tests.cluster import Cluster, CountingProxy, Registry, member_session, push_blob
from tests.images import push_image

MiB = 1 << 20


def _validator(spec: dict, ref: str) -> jsonschema.Draft202012Validator:
    """A validator for one schema of the document, its $refs resolved inside the document."""
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    registry = SchemaRegistry().with_resource("urn:spec", resource)
    return jsonschema.Draft202012Validator({"$ref": f"urn:spec{ref}"}, registry=registry)


def _response_schema(spec: dict, path: str, method: str) -> str:
    op = spec["paths"][path][method]
    ok = op["responses"].get("200") or op["responses"]["202"]
    return "#" + ok["content"]["application/json"]["schema"]["$ref"].removeprefix("#")


def test_every_route_is_documented() -> None:
    app = SchedulerAPI(MemoryStore(), scheduler_id="x").app()
    documented = {(m.upper(), p) for p, ops in document()["paths"].items() for m in ops}
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None and route.method != "HEAD"
              and route.resource.canonical.startswith("/api/v1")
              and route.resource.canonical != "/api/v1/openapi.json"}
    assert served == documented, (served - documented, documented - served)
    jsonschema.Draft202012Validator.check_schema(document()["components"]["schemas"]["Stats"])


async def test_live_responses_match_the_document(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(2 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    await push_image(registry.url, repo, "v1", [MiB])
    sched = await cluster.scheduler("--allow-registry", origin.url)
    a, _ = await asyncio.gather(cluster.peer("a", sched.url, origin.url, "--seed"),
                                cluster.peer("b", sched.url, origin.url))
    async with aiohttp.ClientSession() as s, member_session() as member:
        async with s.get(f"{a.url}/v2/{repo}/blobs/{digest}") as r:
            assert await r.read() == blob
        async with s.get(f"{sched.url}/api/v1/openapi.json") as r:
            spec = await r.json()
        assert spec["openapi"].startswith("3.1")
        async with member.post(f"{sched.url}/api/v1/preheat",  # an operator call: signed
                               json={"image": f"http://{origin.host}/{repo}:v1"}) as r:
            assert r.status == 202
            job = await r.json()
            _validator(spec, _response_schema(spec, "/api/v1/preheat", "post")).validate(job)
        checks = [("/api/v1/peers", "/api/v1/peers"),
                  ("/api/v1/peers/a", "/api/v1/peers/{peer_id}"),
                  ("/api/v1/tasks", "/api/v1/tasks"),
                  (f"/api/v1/tasks/{digest}", "/api/v1/tasks/{task_id}"),
                  ("/api/v1/stats", "/api/v1/stats"), ("/api/v1/jobs", "/api/v1/jobs"),
                  (f"/api/v1/jobs/{job['id']}", "/api/v1/jobs/{job_id}")]
        # Both shapes: the summary anyone gets, and the full view of a signed caller.
        for (url, path), client in [(c, client) for c in checks for client in (s, member)]:
            async with client.get(sched.url + url) as r:
                assert r.status == 200, url
                body = await r.json()
            _validator(spec, _response_schema(spec, path, "get")).validate(body)
        # A refusal is the documented error shape.
        async with s.get(f"{sched.url}/api/v1/peers/nobody") as r:
            assert r.status == 404
            _validator(spec, "#/components/schemas/Error").validate(await r.json())
