"""The scheduler's HTTP API: thin handlers that parse a wire model, call the store, answer JSON.

Internal calls (peers registering, announcing, asking for parents) need the cluster secret when
one is set; mutating operator calls need `Authorization: Bearer <token>` when `--token` is set.
"""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from common import auth
from common.metrics import SchedulerMetrics, metrics_handler
from common.models import (
    Announce,
    BlobMismatch,
    Heartbeat,
    PeerRegistration,
    RegisterReply,
    Report,
    ScheduleReply,
    ScheduleRequest,
    TaskRequest,
    split_hostport,
)
from common.web import (
    RequestError,
    errors_as_json,
    healthy,
    is_loopback,
    model_response,
    parse_body,
)
from scheduler.state import StateError
from scheduler.store import Store

API = "/api/v1"
# (method, route) pairs peers call: guarded by the cluster secret.
INTERNAL = {
    ("POST", f"{API}/peers"), ("POST", f"{API}/peers/{{peer_id}}/heartbeat"),
    ("POST", f"{API}/peers/{{peer_id}}/leave"), ("POST", f"{API}/tasks"),
    ("POST", f"{API}/announce"), ("POST", f"{API}/schedule"), ("POST", f"{API}/reports"),
    ("POST", f"{API}/mismatches"),
}


class SchedulerAPI:
    def __init__(self, store: Store, *, scheduler_id: str, udp_addr: str | None = None,
                 token: str | None = None, secret: bytes | None = None) -> None:
        self.store = store
        self.scheduler_id = scheduler_id
        self.udp_addr = udp_addr
        self.token = token
        self.secret = secret
        self._snapshot: dict[str, int] = {"origin": 0, "peer": 0, "local": 0, "served": 0,
                                          "uploaded": 0}
        self.metrics = SchedulerMetrics(lambda: self._snapshot, self._ratio)

    def _ratio(self) -> float:
        c = self._snapshot
        return 1.0 - c["origin"] / c["served"] if c["served"] else 0.0

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=4 << 20,
            middlewares=[errors_as_json, auth.require_secret(self.secret, self._internal)])
        r = app.router
        r.add_post(f"{API}/peers", self.register)
        r.add_get(f"{API}/peers", self.list_peers)
        r.add_get(f"{API}/peers/{{peer_id}}", self.get_peer)
        r.add_delete(f"{API}/peers/{{peer_id}}", self.cordon)
        r.add_post(f"{API}/peers/{{peer_id}}/uncordon", self.uncordon)
        r.add_post(f"{API}/peers/{{peer_id}}/heartbeat", self.heartbeat)
        r.add_post(f"{API}/peers/{{peer_id}}/leave", self.leave)
        r.add_post(f"{API}/tasks", self.ensure_task)
        r.add_get(f"{API}/tasks", self.list_tasks)
        r.add_get(f"{API}/tasks/{{task_id}}", self.get_task)
        r.add_post(f"{API}/announce", self.announce)
        r.add_post(f"{API}/schedule", self.schedule)
        r.add_post(f"{API}/reports", self.report)
        r.add_post(f"{API}/mismatches", self.mismatch)
        r.add_get(f"{API}/stats", self.stats)
        r.add_get("/metrics", self.metrics_endpoint)
        r.add_get("/healthy", healthy)
        return app

    @staticmethod
    def _internal(request: web.Request) -> bool:
        info = request.match_info.route.resource
        canonical = info.canonical if info is not None else request.path
        return (request.method, canonical) in INTERNAL

    def _operator(self, request: web.Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "operator token required: Authorization: Bearer <token>")

    @staticmethod
    async def _call(coro):
        try:
            return await coro
        except StateError as e:
            raise RequestError(e.status, str(e)) from None

    # -- internal --------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        reg = await parse_body(request, PeerRegistration)
        host, _ = split_hostport(reg.upload_addr)
        if is_loopback(host) and request.remote and not is_loopback(request.remote):
            raise RequestError(400, f"upload address {reg.upload_addr} is loopback but the "
                                    f"peer connects from {request.remote}: set --advertise")
        await self.store.register(reg)
        return model_response(RegisterReply(
            peer_id=reg.id, heartbeat_interval=self.store.heartbeat_interval,
            udp_addr=self.udp_addr, scheduler_id=self.scheduler_id))

    async def heartbeat(self, request: web.Request) -> web.Response:
        hb = await parse_body(request, Heartbeat)
        await self._call(self.store.heartbeat(request.match_info["peer_id"], hb))
        return web.json_response({})

    async def leave(self, request: web.Request) -> web.Response:
        await self._call(self.store.leave(request.match_info["peer_id"]))
        return web.json_response({})

    async def ensure_task(self, request: web.Request) -> web.Response:
        req = await parse_body(request, TaskRequest)
        return model_response(await self._call(self.store.ensure_task(req)))

    async def announce(self, request: web.Request) -> web.Response:
        ann = await parse_body(request, Announce)
        return model_response(await self._call(self.store.announce(ann)))

    async def schedule(self, request: web.Request) -> web.Response:
        req = await parse_body(request, ScheduleRequest)
        started = time.perf_counter()
        decisions = await self._call(self.store.schedule(req))
        if req.wait_ms == 0:
            self.metrics.schedule_seconds.observe(time.perf_counter() - started)
        granted = sum(1 for d in decisions if d.action == "source" and d.first == d.piece)
        if granted:
            self.metrics.back_to_source.inc(granted)
        return model_response(ScheduleReply(decisions=decisions))

    async def report(self, request: web.Request) -> web.Response:
        rep = await parse_body(request, Report)
        await self._call(self.store.report(rep))
        return web.json_response({})

    async def mismatch(self, request: web.Request) -> web.Response:
        m = await parse_body(request, BlobMismatch)
        await self._call(self.store.blob_mismatch(m.peer_id, m.task_id))
        return web.json_response({})

    # -- operators -------------------------------------------------------------------------

    async def list_peers(self, _: web.Request) -> web.Response:
        return web.json_response({"peers": await self.store.peers()})

    async def get_peer(self, request: web.Request) -> web.Response:
        peer = await self.store.peer(request.match_info["peer_id"])
        if peer is None:
            raise RequestError(404, f"unknown peer {request.match_info['peer_id']}")
        return web.json_response(peer)

    async def cordon(self, request: web.Request) -> web.Response:
        self._operator(request)
        await self._call(self.store.cordon(request.match_info["peer_id"]))
        return web.json_response({"cordoned": request.match_info["peer_id"]})

    async def uncordon(self, request: web.Request) -> web.Response:
        self._operator(request)
        await self._call(self.store.uncordon(request.match_info["peer_id"]))
        return web.json_response({"uncordoned": request.match_info["peer_id"]})

    async def list_tasks(self, _: web.Request) -> web.Response:
        return web.json_response({"tasks": await self.store.tasks()})

    async def get_task(self, request: web.Request) -> web.Response:
        task = await self.store.task(request.match_info["task_id"])
        if task is None:
            raise RequestError(404, f"unknown task {request.match_info['task_id']}")
        return web.json_response(task)

    async def stats(self, _: web.Request) -> web.Response:
        counters = await self.store.counters()
        self._snapshot = counters
        peers = await self.store.peers()
        tasks = await self.store.tasks()
        return web.json_response({
            "peers": len(peers), "tasks": len(tasks),
            "bytes": {k: counters[k] for k in ("origin", "peer", "local")},
            "served_bytes": counters["served"], "uploaded_bytes": counters["uploaded"],
            "savings_ratio": self._ratio(),
            "back_to_source": await self.store.back_to_source(),
        })

    async def metrics_endpoint(self, request: web.Request) -> web.StreamResponse:
        self._snapshot = await self.store.counters()
        self.metrics.peers.set(len(await self.store.peers()))
        self.metrics.tasks.set(len(await self.store.tasks()))
        return await metrics_handler(self.metrics.registry)(request)
