"""The peer's side of the scheduler protocol, assembled from six parts each tested alone:

- peer/sched_transport.py: signed calls, and what counts as a usable reply;
- peer/sched_framed.py: the hot calls over one persistent framed connection, where offered;
- peer/sched_session.py: registration with failover across `--scheduler` URLs;
- peer/sched_heartbeats.py: heartbeats over UDP, over HTTP when datagrams go unanswered;
- peer/sched_reannounce.py: everything the store holds, told after each registration;
- peer/sched_outbox.py: announcements and withdrawals coalesced in order, deferred claims
  announced again.

When no scheduler answers, calls raise `SchedulerUnavailable` at once (the engine then serves
from known holders or the origin) while the session keeps trying to register. Its loops are
supervised: one that fails is restarted with backoff and counted in
`naiad_background_restarts_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

import aiohttp

from common.models import (
    AccessAnswer,
    AccessQuery,
    AccessReply,
    Decision,
    Heartbeat,
    PeerRegistration,
    Report,
    ScheduleReply,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
    Work,
    WorkItem,
)
from common.tasks import RestartCounter, TaskSet
from peer.sched_framed import FramedTransport
from peer.sched_heartbeats import Heartbeats, UdpBeacon
from peer.sched_outbox import Outbox
from peer.sched_reannounce import reannounce
from peer.sched_session import API, FailoverSession
from peer.sched_transport import (
    PARTS,
    HttpTransport,
    SchedulerRefused,
    SchedulerUnavailable,
    Transport,
)
from peer.store import ChunkStore

__all__ = ["SchedulerClient", "SchedulerRefused", "SchedulerUnavailable"]
log = logging.getLogger("naiad.peer.scheduler")
# A decision call may take its long poll plus this: a scheduler that goes silent mid-call (a
# partition) is noticed this soon after, and the engine's outage rules take over.
DECISION_SLACK = 2.0


class SchedulerClient:
    def __init__(self, urls: list[str], registration: PeerRegistration,
                 session: aiohttp.ClientSession, store: ChunkStore,
                 heartbeat: Callable[[], Heartbeat], secret: bytes | None = None,
                 restarts: RestartCounter | None = None,
                 transport: Transport | None = None) -> None:
        self.registration = registration
        self.store = store
        # The hot calls over one framed connection per scheduler, HTTP where it has none.
        self._own = transport is None
        self.transport = transport or FramedTransport(HttpTransport(session, secret), secret)
        self.session = FailoverSession(urls, registration, self.transport, self._reannounce)
        self.outbox = Outbox(registration.id, self.session)
        self.heartbeats = Heartbeats(self.session, heartbeat, UdpBeacon(secret))
        self._tasks = TaskSet("scheduler-client", restarts)
        self._plain: set[str] = set()  # schedulers that take no announce with schedule calls

    # What the engine, the seeder and the tests read.
    @property
    def url(self) -> str:
        return self.session.url

    @property
    def connected(self) -> asyncio.Event:
        return self.session.connected

    @property
    def interval(self) -> float:
        return self.session.interval

    @property
    def beats(self) -> Counter[str]:
        return self.heartbeats.beats

    async def wait_back(self, seconds: float) -> bool:
        return await self.session.wait_back(seconds)

    def recently_lost(self) -> bool:
        return self.session.recently_lost()

    def longest_silence(self, since: float) -> float:
        return self.session.silences.longest(since, time.monotonic())

    async def start(self) -> None:
        self._tasks.supervise("scheduler-session", self.session.run)
        self._tasks.supervise("scheduler-heartbeats", self.heartbeats.run)
        self._tasks.supervise("scheduler-announcer", self.outbox.run)

    async def stop(self, leave: bool = True) -> None:
        if leave and self.session.connected.is_set():
            with contextlib.suppress(SchedulerUnavailable, SchedulerRefused):
                await self.session.post(f"{API}/peers/{self.registration.id}/leave", None,
                                        None, seconds=2.0)
        await self._tasks.close()
        self.heartbeats.close()
        if self._own and isinstance(self.transport, FramedTransport):
            await self.transport.close()

    async def _reannounce(self) -> None:
        await reannounce(self.registration.id, self.store, self.session,
                         self.outbox.registries, self.outbox)

    # -- calls the engine makes ------------------------------------------------------------

    async def ensure_task(self, req: TaskRequest) -> TaskMeta:
        return await self.session.call(f"{API}/tasks", req, TaskMeta)

    async def schedule(self, task_id: str, pieces: list[int], exclude: set[str],
                       wait_ms: int, registry: str | None = None,
                       part: Callable[[list[Decision]], None] | None = None
                       ) -> list[Decision]:
        """Decisions for `pieces`; the task's queued claims ride along (one call, not two),
        unless the scheduler in use is one from before that (it refuses the field: 400).
        `part`: where decisions made while the call long-polls go as they come, when the
        scheduler answers in parts (framed calls); the call's answer is then the rest."""
        token = None if part is None else PARTS.set(
            lambda reply: part(reply.decisions))
        try:
            return await self._schedule(task_id, pieces, exclude, wait_ms, registry)
        finally:
            if token is not None:
                PARTS.reset(token)

    async def _schedule(self, task_id: str, pieces: list[int], exclude: set[str],
                        wait_ms: int, registry: str | None) -> list[Decision]:
        url = self.session.url
        ann = self.outbox.lend(task_id) if url not in self._plain else None
        req = ScheduleRequest(peer_id=self.registration.id, task_id=task_id, pieces=pieces,
                              exclude=sorted(exclude)[:256], wait_ms=wait_ms,
                              registry=registry, announce=ann)
        seconds = wait_ms / 1000 + DECISION_SLACK
        try:
            reply = await self.session.call(f"{API}/schedule", req, ScheduleReply, seconds)
        except SchedulerRefused as e:
            if ann is None:
                raise
            self.outbox.unsent(ann)
            if e.status != 400:
                raise
            reply = await self.session.call(f"{API}/schedule",
                                            req.model_copy(update={"announce": None}),
                                            ScheduleReply, seconds)
            self._plain.add(url)  # the field was what it refused: announce apart from now on
            log.info("scheduler %s takes no announcements with schedule calls", url)
            return reply.decisions
        except BaseException:
            if ann is not None:
                self.outbox.unsent(ann)
            raise
        if ann is not None:
            if reply.announced is not None:
                self.outbox.answered(ann, reply.announced)
            else:
                self.outbox.unsent(ann)
        return reply.decisions

    async def lookup_access(self, key: str, wait_ms: int) -> AccessReply:
        """Another peer's registry answer for this access key, or the claim to ask
        (scheduler/access.py)."""
        q = AccessQuery(peer_id=self.registration.id, key=key, wait_ms=wait_ms)
        return await self.session.call(f"{API}/access", q, AccessReply,
                                       seconds=wait_ms / 1000 + DECISION_SLACK)

    async def publish_access(self, key: str, status: int, length: int | None,
                             ttl_ms: int) -> None:
        a = AccessAnswer(peer_id=self.registration.id, key=key, status=status, length=length,
                         ttl_ms=ttl_ms)
        if not self.session.connected.is_set():
            raise SchedulerUnavailable("not registered with any scheduler", unusable=False)
        await self.session.post(f"{API}/access/answers", a, None, seconds=DECISION_SLACK)

    async def work(self) -> list[WorkItem]:
        """Preheat work for this (seed) peer."""
        reply = await self.session.call(f"{API}/peers/{self.registration.id}/work",
                                        Heartbeat(), Work)
        return reply.items

    def report(self, parent_id: str, task_id: str, piece: int | None, kind: str) -> None:
        """Tell the scheduler a parent failed, stalled or sent corrupt bytes (best effort)."""
        if self.session.connected.is_set():
            rep = Report(peer_id=self.registration.id, parent_id=parent_id, task_id=task_id,
                         piece=piece, kind=kind)
            self._tasks.spawn(self._quiet_post(f"{API}/reports", rep), "scheduler-report")

    async def _quiet_post(self, path: str, body: Report) -> None:
        try:
            await self.session.post(path, body, None)
        except (SchedulerUnavailable, SchedulerRefused) as e:
            log.info("report to scheduler dropped: %s", e)

    # -- the outbox ------------------------------------------------------------------------

    def announce(self, task_id: str, index: int, chunk: str,
                 registry: str | None = None, source: str = "origin") -> None:
        self.outbox.announce(task_id, index, chunk, registry, source)

    def withdraw(self, task_id: str, pieces: list[int] | None) -> None:
        self.outbox.withdraw(task_id, pieces)

    def blob_mismatch(self, task_id: str, registry: str | None = None) -> None:
        self.outbox.blob_mismatch(task_id, registry)

    def progress(self, task_id: str, epoch: int) -> None:
        self.outbox.progress(task_id, epoch)

    def sealed(self, task_id: str, registry: str | None = None) -> None:
        self.outbox.sealed(task_id, registry)
