"""The scheduler's HTTP API: thin handlers that parse a wire model, call the store, answer JSON.

Internal calls (peers registering, announcing, asking for parents) need the cluster secret's
signature when one is set. Mutating operator calls need `Authorization: Bearer <token>` when
`--token` is set, else a signature (`naiad status` and `naiad preheat` sign with the per-user
secret); they are open only with neither a token nor a secret (`--insecure`). The views show
what could reassemble a private blob or leak a credential (chunk ids, holders, leases, upload
addresses, preheat URLs and errors) only to a signed caller or the operator token; others get
the summary the console shows.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import BaseModel
from redis.exceptions import RedisError

from common import auth
from common.limits import Throttle
from common.log import request_id, request_ids, take_id
from common.metrics import SchedulerMetrics, metrics_handler
from common.models import (
    MAX_BATCH,
    UNKNOWN_PEER,
    Announce,
    AnnounceReply,
    BlobMismatch,
    Decision,
    Heartbeat,
    PeerRegistration,
    PreheatRequest,
    RegisterReply,
    Report,
    ScheduleRequest,
    TaskRequest,
    Withdraw,
    Work,
    WorkItem,
    schedule_reply_json,
    split_hostport,
)
from common.pieces import PieceLayout
from common.registries import AllowList
from common.tasks import describe
from common.web import (
    ANSWERED,
    REPORT_EVERY,
    Handler,
    RequestError,
    as_json,
    done,
    healthy,
    is_loopback,
    parse_body,
    parse_json,
    refused,
)
from scheduler import access, access_api, history, openapi, preheat
from scheduler.redis_store import StoreBusy
from scheduler.state import StateError, UnknownPeer
from scheduler.store import PARTS, Store

log = logging.getLogger("naiad.scheduler.api")
API = "/api/v1"
# A hot route's core: (peer id from the path, body bytes, caller's address) -> reply bytes.
Core = Callable[[str | None, bytes, str | None], Awaitable[bytes]]
DONE = b"{}"  # what a call that answers nothing but that it was done replies
# (method, route) pairs peers call: guarded by the cluster secret.
INTERNAL = {
    ("POST", f"{API}/peers"), ("POST", f"{API}/peers/{{peer_id}}/heartbeat"),
    ("POST", f"{API}/peers/{{peer_id}}/leave"), ("POST", f"{API}/tasks"),
    ("POST", f"{API}/announce"), ("POST", f"{API}/schedule"), ("POST", f"{API}/reports"),
    ("POST", f"{API}/mismatches"), ("POST", f"{API}/peers/{{peer_id}}/work"),
    ("POST", f"{API}/withdraw"),
} | access_api.INTERNAL


_UNAVAILABLE = Throttle(REPORT_EVERY)  # Redis down: one line a period, not one per call


def store_unavailable(where: str, e: RedisError | StoreBusy) -> RequestError:
    """Redis down or restarting: a 503 peers treat as "scheduler unavailable" (they fall back
    and retry), not a 500 with a traceback."""
    dropped = _UNAVAILABLE.ready()
    if dropped is not None:
        log.warning("%s: state store unavailable (%s); answered 503 (%d more not "
                    "logged)", where, describe(e), dropped)
    return RequestError(503, f"scheduler state store unavailable: {e}")


def edge(verifier: auth.Verifier | None,
         internal: Callable[[web.Request], bool]) -> Middleware:
    """The one middleware of every route, in this order: the request's id (log.take_id), the
    signature (auth.admit), the handler, the state store's failures as 503 and refusals as
    JSON (web.as_json). One coroutine frame per request instead of four: a call's own cost
    on the hot routes is about aiohttp's, so each frame and hop counts."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = take_id(request)
        try:
            refusal = await auth.admit(verifier, internal, request)
            return refusal if refusal is not None else await handler(request)
        except (RedisError, StoreBusy) as e:
            return refused(store_unavailable(f"{request.method} {request.path}", e))
        except ANSWERED as e:
            answer = as_json(e)
            if answer is None:
                raise
            return answer
        finally:
            request_id.reset(token)

    return middleware


class SchedulerAPI:
    def __init__(self, store: Store, *, scheduler_id: str, udp_addr: str | None = None,
                 token: str | None = None, secret: bytes | None = None,
                 allow: AllowList | None = None,
                 history_log: history.HistoryLog | None = None) -> None:
        self.store = store
        self.scheduler_id = scheduler_id
        self.udp_addr = udp_addr
        self.token = token
        self.secret = secret
        self.verifier = auth.Verifier(secret) if secret is not None else None
        self._snapshot: dict[str, int] = {"origin": 0, "peer": 0, "local": 0, "served": 0,
                                          "uploaded": 0}
        self.metrics = SchedulerMetrics(lambda: self._snapshot, self._ratio)
        # The labelled children, looked up once (a labels() call is ~2 us per heartbeat).
        self._beats = {result: self.metrics.heartbeats.labels("http", result)
                       for result in ("accepted", "unknown")}
        self.allow = allow or AllowList([], owner="scheduler")  # what preheat may reach
        self.jobs = preheat.JobBook()
        # The cluster's totals over time (sampled by the server's loop; unsampled, it is empty).
        self.history = history_log or history.MemoryHistory(store.counters)
        # Registry access answers shared by the peers (scheduler/access.py).
        self.access = access.AccessService(access.book_for(store))

    def _ratio(self) -> float:
        c = self._snapshot
        return 1.0 - c["origin"] / c["served"] if c["served"] else 0.0

    def app(self) -> web.Application:
        app = request_ids(web.Application(
            client_max_size=4 << 20, middlewares=[edge(self.verifier, self._internal)]),
            middleware=False)
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
        r.add_post(f"{API}/withdraw", self.withdraw)
        r.add_post(f"{API}/mismatches", self.mismatch)
        r.add_get(f"{API}/stats", self.stats)
        r.add_get(f"{API}/history", self.history_view)
        r.add_post(f"{API}/preheat", self.preheat)
        r.add_get(f"{API}/jobs", self.list_jobs)
        r.add_get(f"{API}/jobs/{{job_id}}", self.get_job)
        r.add_post(f"{API}/peers/{{peer_id}}/work", self.work)
        access_api.AccessRoutes(self.access, self.secret).mount(r)
        r.add_get(f"{API}/openapi.json", self.openapi)
        r.add_get("/metrics", self.metrics_endpoint)
        r.add_get("/healthy", healthy)
        r.add_get("/", self.console_page)
        r.add_get("/console/{file}", self.console_file)
        return app

    @staticmethod
    def _internal(request: web.Request) -> bool:
        info = request.match_info.route.resource
        canonical = info.canonical if info is not None else request.path
        return (request.method, canonical) in INTERNAL

    def _operator(self, request: web.Request) -> None:
        """Mutating operator calls: the token when there is one, else a member's signature."""
        if self.token is not None:
            if not auth.bearer_matches(request.headers.get("Authorization"), self.token):
                raise RequestError(401, "operator token required: Authorization: Bearer "
                                        "<token>")
        elif not auth.is_member(request):
            raise RequestError(401, f"operator call: sign it with the cluster secret "
                                    f"({auth.HEADER}; naiad status and preheat do) or start "
                                    f"the scheduler with --token")

    def _privileged(self, request: web.Request) -> bool:
        """May this caller see chunk ids, holders, addresses and URLs? A signed caller or the
        operator token; a wrong token is refused rather than quietly given less."""
        given = request.headers.get("Authorization")
        if self.token is not None and given is not None:
            if not auth.bearer_matches(given, self.token):
                raise RequestError(401, "wrong operator token")
            return True
        return auth.is_member(request)

    @staticmethod
    async def _call(coro):
        try:
            return await coro
        except StateError as e:
            # The code, not the message, is what tells a peer to register again.
            code = UNKNOWN_PEER if isinstance(e, UnknownPeer) else None
            raise RequestError(e.status, str(e), code) from None

    # -- internal --------------------------------------------------------------------------

    # The hot routes, each one core (peer id from the path, body bytes, the caller's address
    # -> reply bytes) that both the aiohttp route and the framed edge (scheduler/framed.py)
    # call: the same validation, refusals (RequestError), store failures and metrics.

    def cores(self) -> dict[str, Core]:
        """The framed routes' cores by name (common.callframes.ROUTES and PEER_ROUTES)."""
        return {"peers": self.register_core, "heartbeat": self.heartbeat_core,
                "leave": self.leave_core, "tasks": self.ensure_task_core,
                "announce": self.announce_core, "schedule": self.schedule_core,
                "reports": self.report_core, "withdraw": self.withdraw_core,
                "mismatches": self.mismatch_core, "work": self.work_core}

    async def register_core(self, _: str | None, body: bytes, remote: str | None) -> bytes:
        reg = parse_json(body, PeerRegistration)
        host, _ = split_hostport(reg.upload_addr)
        if is_loopback(host) and remote and not is_loopback(remote):
            raise RequestError(400, f"upload address {reg.upload_addr} is loopback but the "
                                    f"peer connects from {remote}: set --advertise")
        await self.store.register(reg)
        return RegisterReply(
            peer_id=reg.id, heartbeat_interval=self.store.heartbeat_interval,
            udp_addr=self.udp_addr, scheduler_id=self.scheduler_id).model_dump_json().encode()

    async def heartbeat_core(self, peer_id: str | None, body: bytes, _: str | None) -> bytes:
        hb = parse_json(body, Heartbeat)
        try:
            await self._call(self.store.heartbeat(peer_id or "", hb))
        except RequestError:
            self._beats["unknown"].inc()
            raise
        self._beats["accepted"].inc()
        return DONE

    async def leave_core(self, peer_id: str | None, _: bytes, __: str | None) -> bytes:
        await self._call(self.store.leave(peer_id or ""))
        return DONE

    async def ensure_task_core(self, _: str | None, body: bytes, __: str | None) -> bytes:
        req = parse_json(body, TaskRequest)
        return _encoded(await self._call(self.store.ensure_task(req)))

    async def announce_core(self, _: str | None, body: bytes, __: str | None) -> bytes:
        ann = parse_json(body, Announce)
        return _encoded(await self._call(self.store.announce(ann)))

    async def schedule_core(self, _: str | None, body: bytes, __: str | None,
                            part: Callable[[bytes], None] | None = None) -> bytes:
        """`part`: the caller takes the answer in parts (the framed edge's PARTS): each
        piece decided while the call is parked goes to it as a reply of its own, and the
        answer is the rest (scheduler/waiting.py)."""
        req = parse_json(body, ScheduleRequest)
        announced = None
        started = time.perf_counter()
        token = None if part is None else PARTS.set(
            lambda decisions: part(self._schedule_reply(req, decisions, None)))
        try:
            if req.announce is not None:
                # What this peer fetched since its last call, recorded first as POST
                # /announce would: the call that asks for the next pieces tells of the last.
                if req.announce.peer_id != req.peer_id:
                    raise RequestError(400, "announce: peer_id must be the requester's")
                announced, decisions = await self._call(  # on Redis: one read, one write
                    self.store.announce_and_schedule(req.announce, req))
            else:
                decisions = await self._call(self.store.schedule(req))
        finally:
            if token is not None:
                PARTS.reset(token)
        if req.wait_ms == 0:
            self.metrics.schedule_seconds.observe(time.perf_counter() - started)
        return self._schedule_reply(req, decisions, announced)

    def _schedule_reply(self, req: ScheduleRequest, decisions: list[Decision],
                        announced: AnnounceReply | None) -> bytes:
        """A schedule answer (or a part of one), counted."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("schedule %s for %s: %s", req.task_id, req.peer_id,
                      " ".join(f"{d.piece}:{d.action}" for d in decisions[:16]))
        granted = sum(1 for d in decisions if d.action == "source" and d.first == d.piece)
        if granted:
            self.metrics.back_to_source.inc(granted)
        return schedule_reply_json(decisions, announced)

    async def report_core(self, _: str | None, body: bytes, __: str | None) -> bytes:
        await self._call(self.store.report(parse_json(body, Report)))
        return DONE

    async def withdraw_core(self, _: str | None, body: bytes, __: str | None) -> bytes:
        await self._call(self.store.withdraw(parse_json(body, Withdraw)))
        return DONE

    async def mismatch_core(self, _: str | None, body: bytes, __: str | None) -> bytes:
        m = parse_json(body, BlobMismatch)
        await self._call(self.store.blob_mismatch(m.peer_id, m.task_id, m.registry))
        return DONE

    async def work_core(self, peer_id: str | None, body: bytes, _: str | None) -> bytes:
        """What a seed peer should fetch for the running preheat jobs."""
        parse_json(body, Heartbeat)
        items = []
        for job in await self._refreshed(list(self.jobs.jobs.values())):
            items += [WorkItem(job=job.id, task_id=i.task_id, url=i.url, registry=i.registry,
                               digest=i.digest) for i in preheat.work_for(job, peer_id or "")]
        return _encoded(Work(items=items[:MAX_BATCH]))

    # The aiohttp routes of the same calls.

    async def register(self, request: web.Request) -> web.Response:
        return _answer(await self.register_core(None, await request.read(), request.remote))

    async def heartbeat(self, request: web.Request) -> web.Response:
        return _answer(await self.heartbeat_core(request.match_info["peer_id"],
                                                 await request.read(), None))

    async def leave(self, request: web.Request) -> web.Response:
        return _answer(await self.leave_core(request.match_info["peer_id"], b"", None))

    async def ensure_task(self, request: web.Request) -> web.Response:
        return _answer(await self.ensure_task_core(None, await request.read(), None))

    async def announce(self, request: web.Request) -> web.Response:
        return _answer(await self.announce_core(None, await request.read(), None))

    async def schedule(self, request: web.Request) -> web.Response:
        return _answer(await self.schedule_core(None, await request.read(), None))

    async def report(self, request: web.Request) -> web.Response:
        return _answer(await self.report_core(None, await request.read(), None))

    async def withdraw(self, request: web.Request) -> web.Response:
        return _answer(await self.withdraw_core(None, await request.read(), None))

    async def mismatch(self, request: web.Request) -> web.Response:
        return _answer(await self.mismatch_core(None, await request.read(), None))

    async def work(self, request: web.Request) -> web.Response:
        return _answer(await self.work_core(request.match_info["peer_id"],
                                            await request.read(), None))

    # -- operators -------------------------------------------------------------------------

    async def list_peers(self, request: web.Request) -> web.Response:
        full = self._privileged(request)
        return web.json_response({"peers": [p if full else _public_peer(p)
                                            for p in await self.store.peers()]})

    async def get_peer(self, request: web.Request) -> web.Response:
        full = self._privileged(request)
        peer = await self.store.peer(request.match_info["peer_id"])
        if peer is None:
            raise RequestError(404, f"unknown peer {request.match_info['peer_id']}")
        return web.json_response(peer if full else _public_peer(peer))

    async def cordon(self, request: web.Request) -> web.Response:
        self._operator(request)
        await self._call(self.store.cordon(request.match_info["peer_id"]))
        return web.json_response({"cordoned": request.match_info["peer_id"]})

    async def uncordon(self, request: web.Request) -> web.Response:
        self._operator(request)
        await self._call(self.store.uncordon(request.match_info["peer_id"]))
        return web.json_response({"uncordoned": request.match_info["peer_id"]})

    async def list_tasks(self, request: web.Request) -> web.Response:
        full = self._privileged(request)
        return web.json_response({"tasks": [t if full else _public_task(t)
                                            for t in await self.store.tasks()]})

    async def get_task(self, request: web.Request) -> web.Response:
        full = self._privileged(request)
        task = await self.store.task(request.match_info["task_id"])
        if task is None:
            raise RequestError(404, f"unknown task {request.match_info['task_id']}")
        grid = piece_grid(task, named=full)
        return web.json_response({**(task if full else _public_task(task)), "grid": grid})

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

    async def history_view(self, _: web.Request) -> web.Response:
        """The cluster's totals over the last hour: public like the stats they sample."""
        h = self.history
        return web.json_response(history.view(await h.samples(), h.interval, h.capacity))

    # -- preheat -------------------------------------------------------------------------

    async def preheat(self, request: web.Request) -> web.Response:
        self._operator(request)
        req = await parse_body(request, PreheatRequest)
        if (req.image is None) == (req.url is None):
            raise RequestError(400, 'give exactly one of "image" or "url"')
        # Refused here (4xx) unless on --allow-registry; 429 when too many jobs are under way.
        if req.image is not None:
            target, resolve = req.image, preheat.image_resolver(req.image, self.allow)
        else:
            target, resolve = req.url, preheat.url_resolver(req.url, req.digest, self.allow)
        job = self.jobs.create(target, resolve)
        return web.json_response(job.view(), status=202)

    async def _seeds(self) -> set[str]:
        return {p["id"] for p in await self.store.peers() if p["seed"]}

    async def _refreshed(self, jobs: list[preheat.Job]) -> list[preheat.Job]:
        """Jobs brought up to date; the seed list is read once for all of them."""
        seeds = await self._seeds() if jobs else set()
        return [await self.jobs.refresh(j, self.store.task, seeds) for j in jobs]

    async def list_jobs(self, request: web.Request) -> web.Response:
        full = self._privileged(request)
        jobs = await self._refreshed(list(self.jobs.jobs.values()))
        return web.json_response({"jobs": [j.view() if full else _public_job(j.view())
                                           for j in jobs]})

    async def get_job(self, request: web.Request) -> web.Response:
        full = self._privileged(request)
        job = self.jobs.jobs.get(request.match_info["job_id"])
        if job is None:
            raise RequestError(404, f"unknown job {request.match_info['job_id']}")
        view = (await self._refreshed([job]))[0].view()
        return web.json_response(view if full else _public_job(view))

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    # -- operator console (static files from scheduler/console, package data) ----------------

    async def console_page(self, _: web.Request) -> web.Response:
        return _console_response("index.html")

    async def console_file(self, request: web.Request) -> web.Response:
        return _console_response(request.match_info["file"])

    async def metrics_endpoint(self, request: web.Request) -> web.StreamResponse:
        """The metrics, also while the state store is down: the process's own series (loop
        restarts among them) matter most then; the cluster gauges keep their last values."""
        try:
            self._snapshot = await self.store.counters()
            self.metrics.peers.set(len(await self.store.peers()))
            self.metrics.tasks.set(len(await self.store.tasks()))
        except (RedisError, StoreBusy) as e:
            log.warning("metrics without the state store: %r", e)
        return await metrics_handler(self.metrics.registry)(request)


# What an unsigned caller is not shown: enough to reassemble a private blob from the upload
# ports (chunk ids, holders, addresses), or a preheat URL's credentials and what preheat reached.
PRIVATE_PEER = frozenset({"upload_addr"})
PRIVATE_TASK = frozenset({"piece_map", "leases"})
PRIVATE_JOB = frozenset({"target", "error"})
PRIVATE_JOB_ITEM = frozenset({"url"})


def _encoded(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


def _answer(body: bytes) -> web.Response:
    """A core's reply over HTTP: `{}` as `web.done()` sends it, anything else as
    `model_response` does."""
    if body is DONE:
        return done()
    return web.Response(body=body, content_type="application/json")


def _public_peer(view: dict) -> dict:
    return {k: v for k, v in view.items() if k not in PRIVATE_PEER}


def _public_task(view: dict) -> dict:
    return {k: v for k, v in view.items() if k not in PRIVATE_TASK}


def piece_grid(task: dict, named: bool) -> list[dict]:
    """A task's piece map turned around: per holder, the runs of pieces it holds (first, last),
    the most complete holders first. An unsigned caller gets the same rows without the holders'
    ids: the picture of how the pieces spread, nothing to fetch them by."""
    held: dict[str, list[int]] = {}
    for piece in task["piece_map"]:
        for holder in piece["holders"]:
            held.setdefault(holder, []).append(piece["index"])
    layout = PieceLayout(task["length"], task["piece_size"])
    rows = sorted(held.items(), key=lambda row: (-len(row[1]), row[0]))
    return [{"holder": holder if named else None, "held": len(pieces),
             "runs": [list(run) for run in layout.runs(pieces, max(1, layout.count))]}
            for holder, pieces in rows]


def _public_job(view: dict) -> dict:
    return {**{k: v for k, v in view.items() if k not in PRIVATE_JOB},
            "items": [{k: v for k, v in i.items() if k not in PRIVATE_JOB_ITEM}
                      for i in view.get("items", [])]}


CONSOLE_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# The page only talks to this scheduler and loads nothing from elsewhere.
CONSOLE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@functools.cache
def _console_files() -> dict[str, bytes]:
    """The console's files, read once from the package."""
    folder = resources.files("scheduler") / "console"
    return {f.name: f.read_bytes() for f in folder.iterdir()
            if f.is_file() and f.name[f.name.rfind("."):] in CONSOLE_TYPES}


def _console_response(name: str) -> web.Response:
    """One of the console's files, by exact name (a fixed set: no path is ever built from the
    request)."""
    body = _console_files().get(name)
    if body is None:
        raise RequestError(404, f"no console file {name}")
    return web.Response(body=body, content_type=CONSOLE_TYPES[name[name.rfind("."):]],
                        charset="utf-8", headers={
                            "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                            "Content-Security-Policy": CONSOLE_CSP})
