"""The scheduler's state store: one async interface, so the API does not care where state lives.

`MemoryStore` keeps a `ClusterState` in this process and wakes long-polling schedule requests
when a task changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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
)
from scheduler.state import ClusterState

# While every wanted piece must wait, re-decide at least this often: leases time out by the clock.
_RECHECK_SECONDS = 0.25


class Store(Protocol):
    heartbeat_interval: float

    async def register(self, reg: PeerRegistration) -> None: ...
    async def heartbeat(self, peer_id: str, hb: Heartbeat) -> None: ...
    async def leave(self, peer_id: str) -> None: ...
    async def expire(self) -> list[str]: ...
    async def ensure_task(self, req: TaskRequest) -> TaskMeta: ...
    async def announce(self, ann: Announce) -> AnnounceReply: ...
    async def schedule(self, req: ScheduleRequest) -> list[Decision]: ...
    async def report(self, rep: Report) -> None: ...
    async def blob_mismatch(self, peer_id: str, task_id: str) -> None: ...
    async def cordon(self, peer_id: str) -> None: ...
    async def uncordon(self, peer_id: str) -> None: ...
    async def peers(self) -> list[dict]: ...
    async def peer(self, peer_id: str) -> dict | None: ...
    async def tasks(self) -> list[dict]: ...
    async def task(self, task_id: str) -> dict | None: ...
    async def counters(self) -> dict[str, int]: ...
    async def back_to_source(self) -> int: ...


class MemoryStore:
    def __init__(self, heartbeat_interval: float = 2.0, lease_timeout: float = 2.0,
                 clock: callable = time.monotonic) -> None:
        self.state = ClusterState(heartbeat_interval=heartbeat_interval,
                                  lease_timeout=lease_timeout)
        self.heartbeat_interval = heartbeat_interval
        self._clock = clock
        self._changed: dict[str, asyncio.Event] = {}

    def _notify(self, task_id: str) -> None:
        event = self._changed.pop(task_id, None)
        if event is not None:
            event.set()

    async def register(self, reg: PeerRegistration) -> None:
        self.state.register(reg, self._clock())

    async def heartbeat(self, peer_id: str, hb: Heartbeat) -> None:
        self.state.heartbeat(peer_id, hb, self._clock())

    async def leave(self, peer_id: str) -> None:
        self.state.leave(peer_id)

    async def expire(self) -> list[str]:
        gone = self.state.expire(self._clock())
        if gone:  # waiters on leases these peers held may now take them over
            for task_id in list(self._changed):
                self._notify(task_id)
        return gone

    async def ensure_task(self, req: TaskRequest) -> TaskMeta:
        return self.state.ensure_task(req, self._clock())

    async def announce(self, ann: Announce) -> AnnounceReply:
        reply = self.state.announce(ann, self._clock())
        if ann.pieces or ann.sealed:
            self._notify(ann.task_id)
        return reply

    async def schedule(self, req: ScheduleRequest) -> list[Decision]:
        deadline = self._clock() + req.wait_ms / 1000
        while True:
            decisions = self.state.schedule(req, self._clock())
            remaining = deadline - self._clock()
            if remaining <= 0 or any(d.action != "wait" for d in decisions):
                return decisions
            event = self._changed.setdefault(req.task_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, _RECHECK_SECONDS))

    async def report(self, rep: Report) -> None:
        self.state.report(rep, self._clock())

    async def blob_mismatch(self, peer_id: str, task_id: str) -> None:
        self.state.blob_mismatch(peer_id, task_id)
        self._notify(task_id)

    async def cordon(self, peer_id: str) -> None:
        self.state.cordon(peer_id)

    async def uncordon(self, peer_id: str) -> None:
        self.state.uncordon(peer_id)

    async def peers(self) -> list[dict]:
        now = self._clock()
        return [self.state.peer_view(p, now) for p in self.state.peers.values()]

    async def peer(self, peer_id: str) -> dict | None:
        p = self.state.peers.get(peer_id)
        return None if p is None else self.state.peer_view(p, self._clock())

    async def tasks(self) -> list[dict]:
        return [self.state.task_view(t, detail=False) for t in self.state.tasks.values()]

    async def task(self, task_id: str) -> dict | None:
        t = self.state.tasks.get(task_id)
        return None if t is None else self.state.task_view(t, detail=True)

    async def counters(self) -> dict[str, int]:
        return self.state.cluster_counters()

    async def back_to_source(self) -> int:
        return self.state.back_to_source
