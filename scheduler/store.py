"""The scheduler's state store: one async interface, so the API does not care where state lives.

`MemoryStore` keeps a `ClusterState` in this process. `RedisStore` (scheduler/redis_store.py)
keeps the state in Redis for any number of replicas and runs the same `ClusterState` rules on the
slice of it each call needs. Both long-poll `schedule` the same way (`Waiters`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Protocol

from common.models import (
    Announce,
    AnnounceReply,
    Decision,
    Heartbeat,
    PeerRegistration,
    Report,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
    Withdraw,
)
from scheduler.state import CHILDREN_PER_HOLDER, ClusterState
from scheduler.waiting import Parked, Parking, Places, call_key, done, wakes

# While every wanted piece must wait, re-decide all of them at least this often, whatever woke
# the call in between: leases time out by the clock, and a wake-up can be lost (a Redis pub/sub
# message is sent at most once).
RECHECK_SECONDS = 0.25
# Parked calls one announced piece wakes, oldest first, when the store does not say how much
# room the announcement made (`Waiters.notify`'s `room`; the memory store does): a new holder
# makes room for about its share of children (and the child it was leaves one place), so waking
# every call parked on the piece had each of a crowd re-decide only to wait again (a fleet's
# 2,600 calls on every announcement). The others re-decide on a later announcement or within
# RECHECK_SECONDS.
WAKE_PER_PIECE = CHILDREN_PER_HOLDER + 2
# Where the schedule call being served sends its parts, when its caller takes its answer in
# parts (scheduler/framed.py, common/callframes.py PARTS); None: one answer. Set by the edge
# around the store call, so every store's long poll (`Waiters`) answers so unchanged.
PARTS: ContextVar[Callable[[list[Decision]], None] | None] = ContextVar("schedule_parts",
                                                                        default=None)


# A store's rules for a schedule call: decide the request's pieces, or only `pieces` of them
# (a parked call's re-decision) when given.
Decide = Callable[[ScheduleRequest, tuple[int, ...] | None], Awaitable[list[Decision]]]


class Store(Protocol):
    heartbeat_interval: float

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def register(self, reg: PeerRegistration) -> None: ...
    async def heartbeat(self, peer_id: str, hb: Heartbeat) -> None: ...
    async def leave(self, peer_id: str) -> None: ...
    async def expire(self) -> list[str]: ...
    async def ensure_task(self, req: TaskRequest) -> TaskMeta: ...
    async def announce(self, ann: Announce) -> AnnounceReply: ...
    async def schedule(self, req: ScheduleRequest) -> list[Decision]: ...
    async def announce_and_schedule(self, ann: Announce, req: ScheduleRequest
                                    ) -> tuple[AnnounceReply, list[Decision]]:
        """A schedule call carrying its peer's claims: `announce(ann)` then `schedule(req)`,
        with their answers (a store may make it one operation: Redis does)."""
        ...
    async def report(self, rep: Report) -> None: ...
    async def withdraw(self, wd: Withdraw) -> None: ...
    async def blob_mismatch(self, peer_id: str, task_id: str,
                            registry: str | None = None) -> None: ...
    async def cordon(self, peer_id: str) -> None: ...
    async def uncordon(self, peer_id: str) -> None: ...
    async def peers(self) -> list[dict]: ...
    async def peer(self, peer_id: str) -> dict | None: ...
    async def tasks(self) -> list[dict]: ...
    async def task(self, task_id: str) -> dict | None: ...
    async def counters(self) -> dict[str, int]: ...
    async def back_to_source(self) -> int: ...


class Waiters:
    """Long-polling schedule calls parked until what they wait for changes.

    A call is registered before it first decides, so a change that lands while it decides
    still counts; woken by an announcement it re-decides only the pieces announced since
    (scheduler/waiting.py says what wakes what), by a task-wide change or every
    `RECHECK_SECONDS` all of them. A peer's next call takes over the waits its last call was
    answered with, if recent and not announced since (`Parking.take`). A store that hears of
    changes from elsewhere (`watch`) starts listening once the call must wait, then decides
    every piece again: what changed before it listened went unheard.
    """

    def __init__(self, watch: Callable[[str], Awaitable[None]] | None = None,
                 unwatch: Callable[[str], None] | None = None) -> None:
        self._parked: dict[str, Parking] = {}
        self._events: dict[Parked, asyncio.Event] = {}
        self._watch = watch
        self._unwatch = unwatch

    def waiting(self, task_id: str) -> int:
        """How many schedule calls on this task are parked here."""
        parking = self._parked.get(task_id)
        return 0 if parking is None else len(parking)

    def notify(self, task_id: str, pieces: Iterable[int] | None = None,
               room: Mapping[int, int | Places] | None = None) -> None:
        """A change of a task: given the `pieces` an announcement added, only the calls
        asking for one of them are concerned, and as many of the oldest woken as each piece
        has `room` for (`ClusterState.room`, counted by the caller's IDC), or without it
        WAKE_PER_PIECE per piece (waking every parked call on every announcement made the
        scheduler re-decide ~16 calls per announcement); else every call, in full."""
        parking = self._parked.get(task_id)
        if parking is None:  # no call on this task parked, nor answered and remembered
            return
        calls = parking.everyone() if pieces is None \
            else parking.announced(pieces, WAKE_PER_PIECE if room is None else room)
        events = self._events
        for call in calls:
            events[call].set()

    def notify_all(self) -> None:
        for task_id in list(self._parked):
            self.notify(task_id)

    async def schedule(self, req: ScheduleRequest, decide: Decide) -> list[Decision]:
        """`decide` until a piece is not `wait`, or `req.wait_ms` (real time) runs out. With
        a `PARTS` sink: each piece decided other than `wait` goes to it as decided, and the
        call stays parked for the rest until every piece is decided (the last of them are the
        answer) or the time runs out (the `wait`s left are).

        A re-decision of some of the call's pieces names them to `decide` (`ClusterState.
        schedule`'s `pieces`) instead of deciding a copy of the request with only those
        (`model_copy`, one per re-decision and per part sent: ~3 % of a fleet replica). One
        timer per call wakes it at its recheck or deadline, moved only when that changes,
        instead of a timeout entered and left around every wait."""
        if req.wait_ms <= 0:
            return await decide(req, None)
        part = PARTS.get()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait_ms / 1000
        parking = self._parked.setdefault(req.task_id, Parking())
        key = call_key(req)
        call = parking.take(key, req.pieces, RECHECK_SECONDS, loop.time())
        whole = call.pieces  # every piece of the request, once each: `decide(req, None)`
        event = asyncio.Event()
        parking.park(call)
        self._events[call] = event
        watching = False
        timer: asyncio.TimerHandle | None = None
        try:
            while True:
                event.clear()
                pieces = call.begin(loop.time())
                if part is None:
                    answer = call.decided(await decide(req, None if pieces is whole
                                                       else pieces)) \
                        if pieces else call.answer()
                    if done(answer) or loop.time() >= deadline:
                        parking.leave(call, key, loop.time())
                        return answer
                else:  # what is left of the call is `wait`: what was not left in a part
                    if pieces:
                        decisions = await decide(req, None if pieces is whole else pieces)
                        call.merge(decisions)
                        ready = parking.settle(call, decisions)
                        if not call.pieces:  # the last decided: the final answer
                            return ready
                        if ready:
                            part(ready)
                    if loop.time() >= deadline:
                        parking.leave(call, key, loop.time())
                        return call.answer()
                if self._watch is not None and not watching:
                    watching = True
                    await self._watch(req.task_id)
                    call.changed_all()
                    continue
                if not call.idle():
                    continue
                wake = min(deadline, call.recheck_at)
                now = loop.time()
                if now < wake:
                    if timer is None or timer.when() != wake:
                        if timer is not None:
                            timer.cancel()
                        timer = loop.call_at(wake, event.set)
                    await event.wait()
                    now = loop.time()
                    if call.woken or now < wake:  # notified: decide what is due
                        continue
                if now >= deadline:  # the time ran out
                    parking.leave(call, key, now)
                    return call.answer()
                call.changed_all()  # the recheck
        finally:
            if timer is not None:
                timer.cancel()
            parking.unpark(call)
            del self._events[call]
            if parking.empty(loop.time()) and self._parked.get(req.task_id) is parking:
                del self._parked[req.task_id]
            if watching and self._unwatch is not None:
                self._unwatch(req.task_id)


class MemoryStore:
    def __init__(self, heartbeat_interval: float = 2.0, lease_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = ClusterState(heartbeat_interval=heartbeat_interval,
                                  lease_timeout=lease_timeout)
        self.heartbeat_interval = heartbeat_interval
        self._clock = clock
        self.waiters = Waiters()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def register(self, reg: PeerRegistration) -> None:
        self.state.register(reg, self._clock())

    async def heartbeat(self, peer_id: str, hb: Heartbeat) -> None:
        self.state.heartbeat(peer_id, hb, self._clock())

    async def leave(self, peer_id: str) -> None:
        self.state.leave(peer_id)
        self.waiters.notify_all()  # waiters on a lease it held may take it over now

    async def expire(self) -> list[str]:
        gone = self.state.expire(self._clock())
        if gone:  # waiters on leases these peers held may now take them over
            self.waiters.notify_all()
        return gone

    async def ensure_task(self, req: TaskRequest) -> TaskMeta:
        return self.state.ensure_task(req, self._clock())

    async def announce(self, ann: Announce) -> AnnounceReply:
        now = self._clock()
        reply = self.state.announce(ann, now)
        pieces = wakes(ann)
        if pieces is None:
            self.waiters.notify(ann.task_id)
        elif pieces:
            self.waiters.notify(ann.task_id, pieces, self.state.room(ann.task_id, pieces, now))
        return reply

    async def schedule(self, req: ScheduleRequest) -> list[Decision]:
        return await self.waiters.schedule(req, self._decide)

    async def _decide(self, req: ScheduleRequest,
                      pieces: tuple[int, ...] | None = None) -> list[Decision]:
        return self.state.schedule(req, self._clock(), pieces)

    async def announce_and_schedule(self, ann: Announce, req: ScheduleRequest
                                    ) -> tuple[AnnounceReply, list[Decision]]:
        return await self.announce(ann), await self.schedule(req)

    async def report(self, rep: Report) -> None:
        self.state.report(rep, self._clock())

    async def withdraw(self, wd: Withdraw) -> None:
        self.state.withdraw(wd)

    async def blob_mismatch(self, peer_id: str, task_id: str,
                            registry: str | None = None) -> None:
        self.state.blob_mismatch(peer_id, task_id, self._clock(), registry)
        self.waiters.notify(task_id)

    async def cordon(self, peer_id: str) -> None:
        self.state.cordon(peer_id)

    async def uncordon(self, peer_id: str) -> None:
        self.state.uncordon(peer_id)

    async def peers(self) -> list[dict]:
        now = self._clock()
        return [self.state.peer_view(self.state.peers[pid], now)
                for pid in sorted(self.state.peers)]

    async def peer(self, peer_id: str) -> dict | None:
        p = self.state.peers.get(peer_id)
        return None if p is None else self.state.peer_view(p, self._clock())

    async def tasks(self) -> list[dict]:
        return [self.state.task_view(self.state.tasks[tid], detail=False)
                for tid in sorted(self.state.tasks)]

    async def task(self, task_id: str) -> dict | None:
        t = self.state.tasks.get(task_id)
        return None if t is None else self.state.task_view(t, detail=True)

    async def counters(self) -> dict[str, int]:
        return self.state.cluster_counters()

    async def back_to_source(self) -> int:
        return self.state.back_to_source
