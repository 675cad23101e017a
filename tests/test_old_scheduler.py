"""A peer of transport 2 with a scheduler from before it (issue 12): that scheduler's model
forbids the unknown `transport` field and refuses the registration (400), so the peer registers
again as HTTP only and remembers it for that scheduler. Against a small real server: the real
scheduler API on loopback, refusing registrations that name the field as the old one did."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from common import auth
from common.models import PeerRegistration
from common.pieces import MiB
from peer.sched_session import API, FailoverSession
from peer.sched_transport import HttpTransport
from scheduler.api import SchedulerAPI
from scheduler.store import MemoryStore
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    free_port,
    pull_digest,
    push_blob,
    serve,
)


@dataclass
class OldScheduler:
    url: str
    registrations: list[dict] = field(default_factory=list)  # every one, refused or taken
    old: bool = True  # False: upgraded, it takes the field


STATE = web.AppKey("state", OldScheduler)


@web.middleware
async def before_transport_2(request: web.Request, handler):
    """A scheduler from before transport 2: its PeerRegistration forbade the field, and
    common/web.py errors_as_json answered the validation error so."""
    if request.path == f"{API}/peers":
        body = json.loads(await request.read())
        state = request.app[STATE]
        state.registrations.append(body)
        if "transport" in body and state.old:
            return web.json_response({"error": "invalid request body: transport: Extra inputs "
                                               "are not permitted"}, status=400)
    return await handler(request)


@pytest.fixture
async def old_scheduler() -> AsyncIterator[OldScheduler]:
    secret = auth.user_secret()  # this test's own (conftest): the peers it starts share it
    app = SchedulerAPI(MemoryStore(), scheduler_id="old", secret=secret).app()
    app.middlewares.insert(0, before_transport_2)
    port = free_port()
    app[STATE] = state = OldScheduler(f"http://127.0.0.1:{port}")
    runner = await serve(app, port)
    yield state
    await runner.cleanup()


async def test_a_refused_transport_is_dropped_for_that_registration(
        old_scheduler: OldScheduler, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "naiad.peer.scheduler")
    reg = PeerRegistration(id="me", upload_addr="127.0.0.1:9", transport=2)
    async with aiohttp.ClientSession() as http:
        session = FailoverSession([old_scheduler.url], reg,
                                  HttpTransport(http, auth.user_secret()))
        assert await session.register()
        assert await session.register()  # a registration again, after a loss
        assert caplog.text.count("registered as HTTP only") == 1, "one line, not one each"
        old_scheduler.old = False  # upgraded: a registration after is transport 2 again
        assert await session.register()
        assert "takes transport 2 now" in caplog.text
    sent = [r.get("transport") for r in old_scheduler.registrations]
    assert sent == [2, None, 2, None, 2]


async def test_a_new_peer_registers_with_an_old_scheduler_and_pulls(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        old_scheduler: OldScheduler) -> None:
    blob = os.urandom(8 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    a = await cluster.peer("peer-a", old_scheduler.url, origin.url, "--log-level", "debug")
    b = await cluster.peer("peer-b", old_scheduler.url, origin.url)
    assert await pull_digest(f"{a.url}/v2/{repo}/blobs/{digest}") == digest
    before = origin.bytes_down
    assert await pull_digest(f"{b.url}/v2/{repo}/blobs/{digest}") == digest
    assert origin.bytes_down - before < MiB  # from peer-a, over HTTP: all the old one knows
    assert "registered as HTTP only" in b.proc.logs()
    logs = a.proc.logs()
    assert "uploaded" in logs and "(framed)" not in logs
    taken = [r for r in old_scheduler.registrations if "transport" not in r]
    assert {r["id"] for r in taken} == {"peer-a", "peer-b"}
