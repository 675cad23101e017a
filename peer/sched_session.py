"""Which scheduler a peer uses: registration with failover across `--scheduler` URLs.

The session registers with the first URL that gives a usable answer, in the order given, and
registers again when that scheduler is lost: it stopped answering, answered something no
scheduler would (see peer/sched_transport.py), or said it does not know this peer (the
`unknown-peer` code). A URL just lost is tried last. Each registration opens a new session
(`session_id`); a late failure of a call sent in an older one does not end its successor.

A scheduler from before transport 2 refuses a registration naming `transport` (its model
forbids the field: 400); the peer registers with it again at once as HTTP only, which is all
that scheduler hands out anyway. Each registration asks with the field first: one comes after
a lost session, which is how a scheduler's upgrade looks from here.

`registered` is set while a session is open (heartbeats go to it), `connected` once the
scheduler was also told what this peer holds (`on_registered`), which calls wait for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel

from common.models import UNKNOWN_PEER, PeerRegistration, RegisterReply
from common.tasks import Backoff
from common.web import split_listen
from peer.sched_transport import SchedulerRefused, SchedulerUnavailable, Transport

log = logging.getLogger("naiad.peer.scheduler")
R = TypeVar("R", bound=BaseModel)
API = "/api/v1"
RETRY_MIN, RETRY_MAX = 0.2, 2.0  # registration retries back off between these


def retry_backoff() -> Backoff:
    """Retries while no scheduler is usable (registration, held announcements): RETRY_MIN
    doubling to RETRY_MAX, from the start again after a success."""
    return Backoff(first=RETRY_MIN, most=RETRY_MAX)
RECENT_SECONDS = 30.0  # a scheduler lost this recently is worth waiting for


class Silences:
    """When the scheduler in use last answered, and the recent silences (gaps between answers
    of at least NOTED seconds): how long it heard nothing from this peer, for a lease holder
    to tell whether its lease has lapsed meanwhile, even if it answers again now."""

    NOTED = 0.5

    def __init__(self, keep: int = 16) -> None:
        self.last: float | None = None
        self._gaps: deque[tuple[float, float]] = deque(maxlen=keep)

    def answered(self, now: float) -> None:
        if self.last is not None and now - self.last >= self.NOTED:
            self._gaps.append((self.last, now))
        self.last = now

    def longest(self, since: float, now: float) -> float:
        """The longest time since `since` without an answer, the current silence included."""
        longest = now - max(since, self.last if self.last is not None else since)
        for start, end in self._gaps:
            if end > since:
                longest = max(longest, end - max(start, since))
        return longest


def registration_order(count: int, avoid: int | None) -> list[int]:
    """The URLs in the order given, the one just lost (if any) last."""
    order = [i for i in range(count) if i != avoid]
    return [*order, avoid] if avoid is not None and 0 <= avoid < count else order


def udp_target(reply: RegisterReply, url: str) -> tuple[str, int] | None:
    """Where heartbeat datagrams go, from a registration reply: a scheduler listening on every
    address is reached at the host its URL names."""
    if not reply.udp_addr:
        return None
    host, port = split_listen(reply.udp_addr)
    if host in ("0.0.0.0", "::"):
        host = urlsplit(url).hostname or "127.0.0.1"
    return host, port


class FailoverSession:
    def __init__(self, urls: list[str], registration: PeerRegistration, transport: Transport,
                 on_registered: Callable[[], Awaitable[None]] | None = None) -> None:
        if not urls:
            raise ValueError("at least one scheduler URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.registration = registration
        self.transport = transport
        self.on_registered = on_registered
        self.current = 0
        self.interval = 2.0
        self.udp_target: tuple[str, int] | None = None
        self.session_id = 0  # one more per registration
        self.registered = asyncio.Event()
        self.connected = asyncio.Event()
        self.lost_at: float | None = None
        self.silences = Silences()
        self._reconnect = asyncio.Event()
        self._avoid: int | None = None
        self._complaints: dict[str, str] = {}  # url -> what it last failed with
        self._http_only: set[str] = set()  # schedulers last seen from before transport 2

    @property
    def url(self) -> str:
        return self.urls[self.current]

    # -- calls -----------------------------------------------------------------------------

    async def post(self, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0, session: int | None = None) -> R | None:
        """A call to the scheduler in use. A failure that shows it unusable, or that it forgot
        this peer, ends the session it was sent in (`session`: the current one)."""
        sid = self.session_id if session is None else session
        url = self.url
        try:
            result = await self.transport.post(url, path, body, reply, seconds)
        except SchedulerUnavailable as e:
            if e.unusable:
                self.lost(sid, f"{e}")
            raise
        except SchedulerRefused as e:
            if e.code == UNKNOWN_PEER:
                self.lost(sid, "it does not know this peer", avoid=False)
            raise
        if sid == self.session_id:
            self.silences.answered(time.monotonic())
        return result

    async def call(self, path: str, body: BaseModel, reply: type[R],
                   seconds: float = 5.0) -> R:
        """A call the engine makes: at once `SchedulerUnavailable` while no session is
        connected (the engine serves from known holders or the origin meanwhile)."""
        if not self.connected.is_set():
            raise SchedulerUnavailable("not registered with any scheduler", unusable=False)
        result = await self.post(path, body, reply, seconds)
        assert result is not None
        return result

    def lost(self, session: int | None = None, why: str = "", avoid: bool = True) -> None:
        """The scheduler of `session` (None: the current one) is lost: register again, there
        last if `avoid`. A loss of an older session is stale and ignored."""
        if session is not None and session != self.session_id:
            return
        if self.registered.is_set():
            log.warning("lost scheduler %s (%s); registering again", self.url, why or "?")
            self.lost_at = time.monotonic()
        if avoid:
            self._avoid = self.current
        self.registered.clear()
        self.connected.clear()
        self._reconnect.set()

    def recently_lost(self) -> bool:
        """No scheduler now, but one was lost less than RECENT_SECONDS ago."""
        return not self.connected.is_set() and self.lost_at is not None \
            and time.monotonic() - self.lost_at <= RECENT_SECONDS

    async def wait_back(self, seconds: float) -> bool:
        """Wait up to `seconds` for a scheduler lost moments ago (a restart, a failover), so a
        short outage is not a stampede on the origin. False at once if it is long gone."""
        if self.connected.is_set():
            return True
        if not self.recently_lost():
            return False
        try:
            await asyncio.wait_for(self.connected.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # -- registration ----------------------------------------------------------------------

    def _complain(self, url: str, what: str) -> None:
        """One warning per URL and kind of failure, not one per retry."""
        kind = what.split(":", 1)[0]
        if self._complaints.get(url) != kind:
            log.warning("scheduler %s: %s", url, what)
        self._complaints[url] = kind

    async def register(self) -> bool:
        """Register with the first scheduler that gives a usable answer; a new session."""
        seconds = max(1.0, min(5.0, self.interval))
        for i in registration_order(len(self.urls), self._avoid):
            url = self.urls[i]
            try:
                reply = await self._register(url, seconds)
            except SchedulerUnavailable as e:
                self._complain(url, f"unusable: {e}" if e.unusable else f"unavailable: {e}")
                continue
            except SchedulerRefused as e:
                self._complain(url, f"refused registration: {e}")
                continue
            self._complaints.pop(url, None)
            self.current, self.interval = i, reply.heartbeat_interval
            self.udp_target = udp_target(reply, url)
            self.session_id += 1
            self._avoid = None
            return True
        return False

    async def _register(self, url: str, seconds: float) -> RegisterReply:
        registration = self.registration
        try:
            reply = await self.transport.post(url, f"{API}/peers", registration, RegisterReply,
                                              seconds)
        except SchedulerRefused as e:
            if e.status != 400 or registration.transport == 1:
                raise
            # Transport 1 leaves the field out of the JSON: what a scheduler before it takes.
            reply = await self.transport.post(url, f"{API}/peers",
                                              registration.model_copy(update={"transport": 1}),
                                              RegisterReply, seconds)
            if url not in self._http_only:  # one line, not one per registration
                log.info("scheduler %s refused the transport field (%s): registered as HTTP "
                         "only with it", url, e)
            self._http_only.add(url)
            assert reply is not None
            return reply
        if url in self._http_only:  # upgraded since
            log.info("scheduler %s takes transport %d now", url, registration.transport)
            self._http_only.discard(url)
        assert reply is not None
        return reply

    async def run(self) -> None:
        """Register, tell the scheduler what this peer holds, stay until the session is lost;
        again. Retries back off while no scheduler is usable."""
        retry = retry_backoff()
        while True:
            self._reconnect.clear()
            if not await self.register():
                await asyncio.sleep(retry.delay())
                continue
            sid = self.session_id
            self.registered.set()  # heartbeats start now, while the holdings are sent
            try:
                if self.on_registered is not None:
                    await self.on_registered()
            except (SchedulerUnavailable, SchedulerRefused) as e:
                log.warning("re-announcing to %s failed: %s", self.url, e)
                self.lost(sid, "re-announcing failed", avoid=False)
                await asyncio.sleep(retry.delay())
                continue
            if sid != self.session_id or self._reconnect.is_set():
                continue  # lost meanwhile
            retry.reset()
            self.connected.set()
            log.info("registered with scheduler %s", self.url)
            await self._reconnect.wait()
