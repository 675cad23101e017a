"""Heartbeats: one per interval to the scheduler of the open session, as a datagram when it
offers UDP and answers it, else over HTTP.

A datagram that goes unanswered (or refused: ICMP port unreachable) does not count: HTTP
carries that heartbeat at once, and if HTTP fails too the session is lost and the peer
registers elsewhere, all within about one interval, so its record (expiring after three silent
intervals) never lapses while it fails over.
After two unanswered datagrams in a row UDP is tried only every `UDP_RETRY_EVERY` heartbeats:
each try costs a wait for an answer that may not come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from pydantic import BaseModel

from common import datagram
from common.models import Heartbeat, PeerRegistration
from common.tasks import describe
from peer.sched_session import API
from peer.sched_transport import SchedulerRefused, SchedulerUnavailable

log = logging.getLogger("naiad.peer.scheduler")
R = TypeVar("R", bound=BaseModel)
UDP_RETRY_EVERY = 10


class DatagramLink(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    def close(self) -> None: ...


Connect = Callable[[tuple[str, int]], Awaitable[DatagramLink]]


class _UdpLink(asyncio.DatagramProtocol):
    """A connected UDP socket as a `DatagramLink`. An ICMP error (port unreachable: the
    scheduler is gone) fails the pending `recv` at once rather than after its timeout, so a
    peer fails over without waiting for an answer that cannot come."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self._waiter: asyncio.Future[bytes] | None = None
        self._error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] - a datagram transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(data)  # else a late answer to an earlier datagram

    def error_received(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        else:
            self._error = exc

    def connection_lost(self, exc: Exception | None) -> None:
        self.error_received(exc or ConnectionResetError("socket closed"))

    async def send(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        assert self.transport is not None
        self.transport.sendto(data)

    async def recv(self) -> bytes:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def udp_connect(target: tuple[str, int]) -> DatagramLink:
    transport, link = await asyncio.get_running_loop().create_datagram_endpoint(
        _UdpLink, remote_addr=target)
    link.transport = transport  # connection_made comes a loop iteration later
    return link


class UdpBeacon:
    """Heartbeat datagrams to one target and their answers."""

    def __init__(self, secret: bytes | None, connect: Connect = udp_connect) -> None:
        self.secret = secret
        self.connect = connect
        self.misses = 0  # unanswered in a row
        self._skipped = 0
        self._target: tuple[str, int] | None = None
        self._link: DatagramLink | None = None

    def due(self, target: tuple[str, int]) -> bool:
        """Whether this heartbeat tries UDP: always while datagrams get through; once two in a
        row went unanswered, every `UDP_RETRY_EVERY`th heartbeat."""
        if target != self._target:
            self._reset(target)
        if self.misses < 2:
            return True
        self._skipped += 1
        return self._skipped % UDP_RETRY_EVERY == 0

    def _reset(self, target: tuple[str, int] | None) -> None:
        self.close()
        self._target, self.misses, self._skipped = target, 0, 0

    async def beat(self, target: tuple[str, int], peer_id: str, body: Heartbeat,
                   wait: float) -> bytes | None:
        """The scheduler's answer (`datagram.ACK_OK`, `ACK_UNKNOWN`) or None: unanswered."""
        if target != self._target:
            self._reset(target)
        try:
            if self._link is None:
                self._link = await self.connect(target)
            await self._link.send(datagram.encode(peer_id, body, self.secret))
            ack = await asyncio.wait_for(self._link.recv(), wait)
        except (OSError, TimeoutError, datagram.DatagramError):
            self.close()
            self.misses += 1
            return None
        self.misses = self._skipped = 0
        return ack

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None


class BeatSession(Protocol):
    """What heartbeats need of the failover session (peer/sched_session.py)."""

    registration: PeerRegistration
    registered: asyncio.Event
    session_id: int
    interval: float
    udp_target: tuple[str, int] | None

    async def post(self, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0, session: int | None = None) -> R | None: ...

    def lost(self, session: int | None = None, why: str = "", avoid: bool = True) -> None: ...


class Heartbeats:
    def __init__(self, session: BeatSession, body: Callable[[], Heartbeat],
                 udp: UdpBeacon) -> None:
        self.session = session
        self.body = body
        self.udp = udp
        self.beats: Counter[str] = Counter()  # heartbeats delivered, by transport
        self._body_failed = False

    def _report(self) -> Heartbeat:
        """What this heartbeat reports (load, counters); when that cannot be measured (the
        data directory gone), an empty report: liveness matters more than the figures."""
        try:
            body = self.body()
        except Exception as e:  # logged once per spell of failures
            if not self._body_failed:
                log.warning("heartbeats carry no load report: %s", describe(e))
            self._body_failed = True
            return Heartbeat()
        self._body_failed = False
        return body

    async def run(self) -> None:
        """One heartbeat per interval while a session is open, on a fixed rate: a slow beat
        (an unanswered datagram, then HTTP) does not push the next one back."""
        while True:
            await self.session.registered.wait()
            started = time.monotonic()
            await self.beat(self.session.session_id)
            left = self.session.interval - (time.monotonic() - started)
            if left > 0:
                await asyncio.sleep(left)

    async def beat(self, sid: int) -> bool:
        """One heartbeat in session `sid`; whether it was delivered. One that cannot be ends
        the session (the peer registers again, elsewhere if need be)."""
        s = self.session
        body = self._report()
        interval = s.interval
        target = s.udp_target
        if target is not None and self.udp.due(target):
            ack = await self.udp.beat(target, s.registration.id, body,
                                      min(1.0, interval / 2))
            if ack is not None:
                self.beats["udp"] += 1
                if ack == datagram.ACK_UNKNOWN:
                    s.lost(sid, "it does not know this peer", avoid=False)
                return True
        try:
            await s.post(f"{API}/peers/{s.registration.id}/heartbeat", body, None,
                         seconds=max(0.5, interval / 2), session=sid)
        except SchedulerUnavailable as e:
            s.lost(sid, f"heartbeat failed: {e}")
            return False
        except SchedulerRefused as e:
            if e.status != 404:  # 404 ends the session in post()
                log.warning("heartbeat refused: %s", e)
            return False
        self.beats["http"] += 1
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.udp.close()
