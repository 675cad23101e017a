"""The peer's side of the scheduler protocol: registration, heartbeats, announcements, schedule
requests and reports, with failover across `--scheduler` URLs.

When no scheduler answers, calls raise `SchedulerUnavailable` at once (the engine then serves
from known holders or the origin) while a background loop keeps trying to register; on success
the peer re-announces everything its store holds, so a scheduler that lost its state relearns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import asyncio_dgram
from pydantic import BaseModel

from common import auth, datagram
from common.log import outgoing
from common.models import (
    Announce,
    AnnounceReply,
    BlobMismatch,
    Decision,
    Heartbeat,
    LeaseProgress,
    PeerRegistration,
    PieceClaim,
    RegisterReply,
    Report,
    ScheduleReply,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
    Withdraw,
    Work,
    WorkItem,
)
from common.tasks import TaskSet
from common.web import split_listen
from peer.store import ChunkStore

log = logging.getLogger("naiad.peer.scheduler")
R = TypeVar("R", bound=BaseModel)
API = "/api/v1"
RETRY_MIN, RETRY_MAX = 0.2, 2.0  # registration retries back off between these
RECENT_SECONDS = 30.0  # a scheduler lost this recently is worth waiting for
ANNOUNCE_BATCH = 4096
UDP_RETRY_EVERY = 10
ANNOUNCE_COALESCE = 0.005


class SchedulerUnavailable(Exception):
    """No scheduler answered."""


class SchedulerRefused(Exception):
    """A scheduler answered with a 4xx the caller must handle."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass
class _Pending:
    """What a task's next messages say, in order: first what this peer no longer holds, then
    that the blob it assembled failed its digest, then what it holds (so a piece dropped and
    fetched again ends up held, never the reverse, and a map reset for a mismatch is not
    poisoned again by this peer's own late announcements of the bad pieces)."""

    pieces: dict[int, str] = field(default_factory=dict)
    progress: set[int] = field(default_factory=set)
    sealed: bool = False
    registry: str | None = None  # where the pieces came from
    mismatch: bool = False
    withdrawn: set[int] = field(default_factory=set)
    withdrawn_all: bool = False

    def withdraw(self, pieces: list[int] | None) -> None:
        if pieces is None:
            self.withdrawn_all, self.withdrawn, self.pieces = True, set(), {}
            self.sealed = False
            return
        if not self.withdrawn_all:
            self.withdrawn.update(pieces)
        for i in pieces:
            self.pieces.pop(i, None)
        self.sealed = False

    def withdraws(self, index: int) -> bool:
        return self.withdrawn_all or index in self.withdrawn


class SchedulerClient:
    def __init__(self, urls: list[str], registration: PeerRegistration,
                 session: aiohttp.ClientSession, store: ChunkStore,
                 heartbeat: Callable[[], Heartbeat], secret: bytes | None = None) -> None:
        if not urls:
            raise ValueError("at least one scheduler URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.registration = registration
        self.session = session
        self.store = store
        self._heartbeat_body = heartbeat
        self.secret = secret
        self.current = 0
        self.connected = asyncio.Event()
        self.lost_at: float | None = None
        self._session_id = 0  # one more per registration
        self.udp_target: tuple[str, int] | None = None
        self._udp: asyncio_dgram.DatagramClient | None = None
        self._udp_misses = 0
        self._udp_skipped = 0
        self.beats: Counter[str] = Counter()  # heartbeats sent, by transport
        self.interval = 2.0
        self._tasks = TaskSet("scheduler-client")
        self._pending: dict[str, _Pending] = {}
        self._registries: dict[str, str] = {}  # task -> registry, for re-announcing
        self._flush_wanted = asyncio.Event()
        self._reconnect = asyncio.Event()

    @property
    def url(self) -> str:
        return self.urls[self.current]

    async def start(self) -> None:
        self._tasks.spawn(self._session_loop(), "scheduler-session")
        self._tasks.spawn(self._announce_loop(), "scheduler-announcer")

    async def stop(self, leave: bool = True) -> None:
        if leave and self.connected.is_set():
            with contextlib.suppress(SchedulerUnavailable, SchedulerRefused):
                await self._post(f"{API}/peers/{self.registration.id}/leave", None, None,
                                 seconds=2.0)
        await self._tasks.close()
        if self._udp is not None:
            self._udp.close()

    # -- transport -------------------------------------------------------------------------

    async def _post(self, path: str, body: BaseModel | None, reply: type[R] | None,
                    seconds: float = 5.0, url: str | None = None) -> R | None:
        headers = {"Content-Type": "application/json", **outgoing()}
        data = (body.model_dump_json() if body is not None else "{}").encode()
        if self.secret is not None:
            headers[auth.HEADER] = auth.sign(self.secret, "POST", path, data)
        # A failure only condemns the session it was sent in: a late error from a replica
        # already failed over from must not tear down the session with its successor.
        session = self._session_id
        try:
            async with self.session.post((url or self.url) + path, data=data, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=seconds,
                                                                       sock_connect=2)) as resp:
                raw = await resp.read()
                if resp.status >= 500:
                    raise SchedulerUnavailable(f"{resp.status} from {url or self.url}")
                if resp.status >= 400:
                    if resp.status == 404 and b"register first" in raw \
                            and session == self._session_id:
                        self._lost()
                    raise SchedulerRefused(resp.status, raw[:300].decode(errors="replace"))
                return reply.model_validate_json(raw) if reply is not None else None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            if url is None and session == self._session_id:
                self._lost()
            raise SchedulerUnavailable(f"{url or self.url}: {e!r}") from e

    async def _call(self, path: str, body: BaseModel, reply: type[R],
                    seconds: float = 5.0) -> R:
        if not self.connected.is_set():
            raise SchedulerUnavailable("not registered with any scheduler")
        result = await self._post(path, body, reply, seconds)
        assert result is not None
        return result

    def _lost(self) -> None:
        """The scheduler we use stopped answering or forgot us: register again."""
        if self.connected.is_set():
            log.warning("lost scheduler %s; registering again", self.url)
        self._disconnected()
        self._reconnect.set()

    def _disconnected(self) -> None:
        if self.connected.is_set():
            self.lost_at = time.monotonic()
        self.connected.clear()

    async def wait_back(self, seconds: float) -> bool:
        """Wait up to `seconds` for a scheduler lost moments ago (a restart, a failover), so a
        short outage is not a stampede on the origin. False at once if it is long gone."""
        if self.connected.is_set():
            return True
        if self.lost_at is None or time.monotonic() - self.lost_at > RECENT_SECONDS:
            return False
        try:
            await asyncio.wait_for(self.connected.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # -- session ---------------------------------------------------------------------------

    async def _register(self) -> bool:
        """Register with the first scheduler that answers, in the order given."""
        for i, url in enumerate(self.urls):
            try:
                reply = await self._post(f"{API}/peers", self.registration, RegisterReply,
                                         url=url)
            except SchedulerUnavailable:
                continue
            except SchedulerRefused as e:
                log.error("scheduler %s refused registration: %s", url, e)
                continue
            assert reply is not None
            self.current, self.interval = i, reply.heartbeat_interval
            self._session_id += 1
            self._use_udp(reply, url)
            return True
        return False

    async def _session_loop(self) -> None:
        retry = RETRY_MIN
        while True:
            self._reconnect.clear()
            if not await self._register():
                await asyncio.sleep(retry)
                retry = min(RETRY_MAX, retry * 2)
                continue
            retry = RETRY_MIN
            try:
                await self._reannounce()
            except (SchedulerUnavailable, SchedulerRefused) as e:
                log.warning("re-announcing to %s failed: %s", self.url, e)
                continue
            # A loss signalled by the old session's calls while this one registered is stale.
            self._reconnect.clear()
            self.connected.set()
            log.info("registered with scheduler %s", self.url)
            while not self._reconnect.is_set():
                try:
                    await self._heartbeat()
                except SchedulerUnavailable:
                    break
                except SchedulerRefused as e:
                    if e.status != 404:
                        log.warning("heartbeat refused: %s", e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reconnect.wait(), self.interval)
            self._disconnected()

    async def _heartbeat(self) -> None:
        """One heartbeat: a datagram when the scheduler offers UDP and answers it, else (or
        when two datagrams in a row went unanswered) over HTTP."""
        body = self._heartbeat_body()
        if self.udp_target is not None and self._udp_due() and await self._udp_heartbeat(body):
            return
        await self._post(f"{API}/peers/{self.registration.id}/heartbeat", body, None)
        self.beats["http"] += 1

    def _udp_due(self) -> bool:
        """Once datagrams stopped getting through, UDP is tried again only every
        `UDP_RETRY_EVERY` heartbeats: each try costs a wait for an answer that may not come."""
        if self._udp_misses < 2:
            return True
        self._udp_skipped += 1
        return self._udp_skipped % UDP_RETRY_EVERY == 0

    async def _udp_heartbeat(self, body: Heartbeat) -> bool:
        """Whether the datagram was answered (an `unknown` answer means register again)."""
        try:
            if self._udp is None:
                self._udp = await asyncio_dgram.connect(self.udp_target)
            await self._udp.send(datagram.encode(self.registration.id, body, self.secret))
            ack, _ = await asyncio.wait_for(self._udp.recv(), min(1.0, self.interval / 2))
        except (OSError, TimeoutError, asyncio_dgram.TransportClosed, datagram.DatagramError):
            if self._udp is not None:
                self._udp.close()
                self._udp = None
            self._udp_misses += 1
            # One lost datagram is noise; two in a row and HTTP carries this heartbeat.
            return self._udp_misses < 2
        self._udp_misses = self._udp_skipped = 0
        self.beats["udp"] += 1
        if ack == datagram.ACK_UNKNOWN:
            self._lost()
        return True

    def _use_udp(self, reply: RegisterReply, url: str) -> None:
        self.udp_target = None
        self._udp_misses = self._udp_skipped = 0
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if reply.udp_addr:
            host, port = split_listen(reply.udp_addr)
            if host in ("0.0.0.0", "::"):  # the scheduler listens everywhere: use its host
                host = urlsplit(url).hostname or "127.0.0.1"
            self.udp_target = (host, port)

    async def _reannounce(self) -> None:
        """Tell a (new or restarted) scheduler every task and piece the store holds."""
        for stored in self.store.tasks():
            try:
                meta = await self._post(f"{API}/tasks", TaskRequest(
                    task_id=stored.meta.task_id, length=stored.meta.length,
                    piece_size=stored.meta.piece_size, digest=stored.meta.digest), TaskMeta)
            except SchedulerRefused as e:
                log.warning("scheduler refused task %s: %s", stored.meta.task_id, e)
                continue
            assert meta is not None
            if meta.piece_size != stored.meta.piece_size:
                log.warning("task %s has piece size %d on the scheduler, %d here: dropping "
                            "the local copy", meta.task_id, meta.piece_size,
                            stored.meta.piece_size)
                self.store.drop_task(meta.task_id)
                continue
            for ann in self._announcements(meta.task_id, stored.pieces, stored.meta.sealed,
                                           set(), self._registries.get(meta.task_id)):
                await self._post(f"{API}/announce", ann, AnnounceReply)

    def _messages(self, task_id: str, p: _Pending) -> list[tuple[str, BaseModel]]:
        """A task's pending withdrawals, then its announcements."""
        gone = sorted(p.withdrawn)
        batches = [None] if p.withdrawn_all else \
            [gone[k:k + ANNOUNCE_BATCH] for k in range(0, len(gone), ANNOUNCE_BATCH)]
        out: list[tuple[str, BaseModel]] = [
            (f"{API}/withdraw", Withdraw(peer_id=self.registration.id, task_id=task_id,
                                         pieces=batch)) for batch in batches]
        if p.mismatch:
            out.append((f"{API}/mismatches", BlobMismatch(
                peer_id=self.registration.id, task_id=task_id, registry=p.registry)))
        if p.pieces or p.sealed or p.progress:
            out += [(f"{API}/announce", a) for a in
                    self._announcements(task_id, p.pieces, p.sealed, p.progress, p.registry)]
        return out

    def _announcements(self, task_id: str, pieces: dict[int, str], sealed: bool,
                       progress: set[int], registry: str | None) -> list[Announce]:
        """Announcements of `pieces`, cut to the batch limit; the seal rides on the last."""
        items = sorted(pieces.items())
        out = []
        for k in range(0, max(1, len(items)), ANNOUNCE_BATCH):
            last = k + ANNOUNCE_BATCH >= len(items)
            out.append(Announce(
                peer_id=self.registration.id, task_id=task_id,
                pieces=[PieceClaim(index=i, chunk=c) for i, c in items[k:k + ANNOUNCE_BATCH]],
                sealed=sealed and last, registry=registry,
                progress=[LeaseProgress(epoch=e) for e in sorted(progress)] if last else []))
        return out

    # -- calls the engine makes ------------------------------------------------------------

    async def ensure_task(self, req: TaskRequest) -> TaskMeta:
        return await self._call(f"{API}/tasks", req, TaskMeta)

    async def schedule(self, task_id: str, pieces: list[int], exclude: set[str],
                       wait_ms: int, registry: str | None = None) -> list[Decision]:
        req = ScheduleRequest(peer_id=self.registration.id, task_id=task_id, pieces=pieces,
                              exclude=sorted(exclude)[:256], wait_ms=wait_ms,
                              registry=registry)
        reply = await self._call(f"{API}/schedule", req, ScheduleReply,
                                 seconds=wait_ms / 1000 + 5.0)
        return reply.decisions

    def report(self, parent_id: str, task_id: str, piece: int | None, kind: str) -> None:
        rep = Report(peer_id=self.registration.id, parent_id=parent_id, task_id=task_id,
                     piece=piece, kind=kind)
        self._fire(f"{API}/reports", rep)

    async def work(self) -> list[WorkItem]:
        """Preheat work for this (seed) peer."""
        reply = await self._call(f"{API}/peers/{self.registration.id}/work", Heartbeat(), Work)
        return reply.items

    def blob_mismatch(self, task_id: str, registry: str | None = None) -> None:
        """The blob assembled from these pieces failed its digest: every piece of it is
        withdrawn, and the scheduler told after that, before anything held since."""
        p = self._pending.setdefault(task_id, _Pending())
        p.withdraw(None)
        p.mismatch = True
        self._registry(task_id, p, registry)
        self._flush_wanted.set()

    def _fire(self, path: str, body: BaseModel) -> None:
        if self.connected.is_set():
            self._tasks.spawn(self._quiet_post(path, body), "scheduler-report")

    async def _quiet_post(self, path: str, body: BaseModel) -> None:
        try:
            await self._post(path, body, None)
        except (SchedulerUnavailable, SchedulerRefused) as e:
            log.info("report to scheduler dropped: %s", e)

    # -- announcements, coalesced ----------------------------------------------------------

    def _requeue(self, task_id: str, p: _Pending) -> None:
        """Put back messages that could not be sent, before whatever queued since."""
        mine = self._pending.setdefault(task_id, _Pending())
        kept = {i: c for i, c in p.pieces.items() if not mine.withdraws(i)}
        mine.pieces = {**kept, **mine.pieces}
        mine.progress |= p.progress
        mine.registry = mine.registry or p.registry
        mine.mismatch |= p.mismatch
        mine.sealed |= p.sealed and not (mine.withdrawn or mine.withdrawn_all)
        mine.withdrawn_all |= p.withdrawn_all
        mine.withdrawn = set() if mine.withdrawn_all else mine.withdrawn | p.withdrawn
        self._flush_wanted.set()

    def withdraw(self, task_id: str, pieces: list[int] | None) -> None:
        """This peer no longer holds these pieces (None: the whole task) of a task. Queued with
        the announcements, so the scheduler hears of drops and gains in the order they
        happened."""
        self._pending.setdefault(task_id, _Pending()).withdraw(pieces)
        if pieces is None:
            self._registries.pop(task_id, None)
        self._flush_wanted.set()

    def announce(self, task_id: str, index: int, chunk: str,
                 registry: str | None = None) -> None:
        p = self._pending.setdefault(task_id, _Pending())
        p.pieces[index] = chunk
        self._registry(task_id, p, registry)
        self._flush_wanted.set()

    def _registry(self, task_id: str, p: _Pending, registry: str | None) -> None:
        if registry is not None:
            p.registry = self._registries[task_id] = registry

    def progress(self, task_id: str, epoch: int) -> None:
        self._pending.setdefault(task_id, _Pending()).progress.add(epoch)
        self._flush_wanted.set()

    def sealed(self, task_id: str, registry: str | None = None) -> None:
        p = self._pending.setdefault(task_id, _Pending())
        p.sealed = True
        self._registry(task_id, p, registry)
        self._flush_wanted.set()

    async def _announce_loop(self) -> None:
        """Send what accumulated since the last send; one request in flight at a time, so a
        burst of pieces becomes a few batches. While no scheduler answers, announcements wait
        for one (a failover takes a moment; the pieces' leases should not lapse meanwhile)."""
        while True:
            await self._flush_wanted.wait()
            await asyncio.sleep(ANNOUNCE_COALESCE)  # a burst of pieces becomes one request
            await self.connected.wait()
            self._flush_wanted.clear()
            pending, self._pending = self._pending, {}
            for task_id, p in pending.items():
                for path, ann in self._messages(task_id, p):
                    announcing = isinstance(ann, Announce)
                    try:
                        reply = await self._post(path, ann,
                                                 AnnounceReply if announcing else None)
                    except SchedulerUnavailable:
                        self._requeue(task_id, p)  # sent again once a scheduler answers
                        break
                    except SchedulerRefused as e:
                        log.info("%s refused: %s", path.rsplit("/", 1)[1], e)
                        if announcing:
                            break
                        continue
                    if reply is not None and reply.rejected:
                        log.warning("scheduler rejected pieces %s of %s", reply.rejected[:10],
                                    task_id)
