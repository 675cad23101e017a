"""The scheduler's framed edge: peers' hot calls over one persistent connection each, on the
HTTP port (common.web.Server's `sniffed`; the wire format is common/callframes.py).

Each CALL runs the same core as its aiohttp route (SchedulerAPI.cores) after the same steps as
the HTTP edge (scheduler/api.py `edge`): the request id, the signature (every framed route is
internal: unsigned calls are refused when there is a secret), the core, the state store's
failures as 503 and refusals as JSON. Calls run concurrently, at most `window` at once per
connection (the WELCOME says so; a peer that sends more is cut off), so a long-polling schedule
call holds up nothing else. A schedule call flagged PARTS (offered in the WELCOME) is answered
in parts: a REPLY flagged PARTS for each piece decided while it is parked, then the final one
(scheduler/waiting.py). A connection that breaks the protocol gets an ERROR and is closed, with
one log line a period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from prometheus_client import Counter
from redis.exceptions import RedisError

from common import auth
from common import callframes as cf
from common.limits import Throttle
from common.log import adopt, request_id
from common.web import REPORT_EVERY, RequestError, error_body
from scheduler.api import SchedulerAPI, store_unavailable
from scheduler.redis_store import StoreBusy

log = logging.getLogger("naiad.scheduler.framed")
WINDOW = 256  # calls in flight per connection: a peer's readers, announcements and beats


class FramedCalls:
    """The `Sniffed` protocol of the scheduler's port: one `_Connection` per peer."""

    preface = cf.PREFACE

    def __init__(self, api: SchedulerAPI, window: int = WINDOW,
                 max_body: int = cf.MAX_BODY, parts: bool = True) -> None:
        self.api = api
        self.window = window
        self.max_body = max_body
        self.parts = parts  # offer schedule answers in parts (off: as a build from before)
        self.cores = api.cores()
        self.verifier = api.verifier  # one nonce cache for both edges: no replay across
        self.connections: set[_Connection] = set()
        self.calls = Counter("naiad_scheduler_framed_calls", "Calls answered over framed "
                             "connections, by route", ["route"], registry=api.metrics.registry)
        self._by_route = {name: self.calls.labels(name) for name in self.cores}
        self.parts_sent = Counter("naiad_scheduler_schedule_parts", "Parts of schedule "
                                  "answers sent while the call stays parked for the rest "
                                  "(calls answered in parts)", registry=api.metrics.registry)
        self._broken = Throttle(REPORT_EVERY)

    def protocol(self) -> asyncio.Protocol:
        return _Connection(self)

    async def close(self) -> None:
        for c in list(self.connections):
            c.abort()
        await asyncio.gather(*(c.drained() for c in list(self.connections)))

    def broken(self, remote: str, why: str) -> None:
        dropped = self._broken.ready()
        if dropped is not None:
            log.warning("framed connection from %s closed: %s (%d more not logged)", remote,
                        why, dropped)

    async def answer(self, call: cf.Call, remote: str | None,
                     part: Callable[[bytes], None] | None = None) -> tuple[int, bytes]:
        """The (status, JSON body) the HTTP route would answer this call with; `part`: where
        the parts of a schedule call flagged PARTS go (ignored if not offered)."""
        token = request_id.set(adopt(call.request_id))
        try:
            hit = cf.route(call.path)
            if hit is None:
                return 404, error_body(f"no framed route {call.path[:200]}")
            name, peer_id = hit
            if self.verifier is not None:
                try:
                    self.verifier.check(call.signature, "POST", call.path, call.body)
                except auth.AuthError as e:
                    return e.status, error_body(e.reason)
            try:
                if name == "schedule" and part is not None and call.parts and self.parts:
                    out = await self.api.schedule_core(peer_id, call.body, remote, part)
                else:
                    out = await self.cores[name](peer_id, call.body, remote)
            except (RedisError, StoreBusy) as e:
                e2 = store_unavailable(f"framed {call.path}", e)
                return e2.status, error_body(e2.message)
            except RequestError as e:
                return e.status, error_body(e.message, **({"code": e.code} if e.code else {}))
            except json.JSONDecodeError as e:
                return 400, error_body(f"invalid JSON: {e}")
            self._by_route[name].inc()
            return 200, out
        finally:
            request_id.reset(token)


class _Connection(asyncio.Protocol):
    """One peer's connection: frames in, a task per call, replies out as they are ready."""

    def __init__(self, edge: FramedCalls) -> None:
        self.edge = edge
        self.reader = cf.Reader(edge.max_body, cf.TO_SCHEDULER)
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.inflight: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else ""
        self.edge.connections.add(self)
        transport.write(cf.welcome(self.edge.window, self.edge.max_body, self.edge.parts))

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # refused already
        try:
            frames = self.reader.feed(data)
        except cf.FrameError as e:
            self._refuse(str(e))
            return
        for f in frames:
            if len(self.inflight) >= self.edge.window:
                self._refuse(f"more than {self.edge.window} calls in flight")
                return
            try:
                call = cf.parse_call(f)
            except cf.FrameError as e:
                self._refuse(str(e))
                return
            task = asyncio.get_running_loop().create_task(self._serve(call))
            self.inflight.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # _serve answers every failure; one getting here is a bug: say so, close.
            log.error("framed call failed", exc_info=task.exception())
            self.abort()

    async def _serve(self, call: cf.Call) -> None:
        def part(body: bytes) -> None:
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(cf.reply(call.call, 200, body, more=True))
                self.edge.parts_sent.inc()
        try:
            status, body = await self.edge.answer(call, self.remote, part)
        except Exception:  # a bug in a core: a 500, as aiohttp answers one, and the traceback
            log.exception("framed call %s failed", call.path[:200])
            status, body = 500, error_body("internal error")
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(cf.reply(call.call, status, body))

    def _refuse(self, why: str) -> None:
        self.edge.broken(self.remote, why)
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(cf.error(why))
            t.close()  # after the ERROR is written
        self._cancel()

    def _cancel(self) -> None:
        for task in self.inflight:
            task.cancel()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._cancel()

    def pause_writing(self) -> None:  # a peer not reading its replies: stop taking calls
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.connections.discard(self)
        self.transport = None
        self._cancel()
        self._closed.set()

    async def drained(self) -> None:
        """Until the connection is closed and its calls have ended."""
        await self._closed.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self.inflight, return_exceptions=True)
