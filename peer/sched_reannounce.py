"""Re-announce: tell a (new or restarted) scheduler every task and piece the store holds, after
each registration, so a scheduler that lost its state relearns it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from common.models import UNKNOWN_PEER, Announce, AnnounceReply, TaskMeta, TaskRequest
from peer.sched_outbox import OutboxSession, announcements
from peer.sched_session import API
from peer.sched_transport import SchedulerRefused
from peer.store import CannotStore, StoredTask

log = logging.getLogger("naiad.peer.scheduler")


class HeldStore(Protocol):
    """What re-announcing needs of the chunk store (peer/store.py)."""

    def tasks(self) -> list[StoredTask]: ...
    def drop_task(self, task_id: str) -> None: ...


class Deferrals(Protocol):
    """Where deferred claims go to be announced again (the outbox)."""

    def deferred(self, task_id: str, reply: AnnounceReply, ann: Announce,
                 attempt: int = 0) -> None: ...


async def reannounce(peer_id: str, store: HeldStore, session: OutboxSession,
                     registries: Mapping[str, str], deferrals: Deferrals) -> None:
    """Every task the store holds, then its pieces. A task the scheduler refuses is skipped;
    one it knows with another piece size is dropped here (the local copy cannot be served
    under that layout). `SchedulerUnavailable` and a refusal for an unknown peer propagate:
    the session registers again."""
    for stored in store.tasks():
        meta = stored.meta
        try:
            known = await session.post(f"{API}/tasks", TaskRequest(
                task_id=meta.task_id, length=meta.length, piece_size=meta.piece_size,
                digest=meta.digest), TaskMeta)
        except SchedulerRefused as e:
            log.warning("scheduler refused task %s: %s", meta.task_id, e)
            continue
        assert known is not None
        if known.piece_size != meta.piece_size:
            log.warning("task %s has piece size %d on the scheduler, %d here: dropping the "
                        "local copy", meta.task_id, known.piece_size, meta.piece_size)
            try:
                store.drop_task(meta.task_id)
            except CannotStore as e:  # not announced either way; the start-up check cleans up
                log.warning("cannot drop the local copy of %s: %s", meta.task_id, e)
            continue
        for ann in announcements(peer_id, meta.task_id, stored.pieces, meta.sealed, set(),
                                 registries.get(meta.task_id)):
            try:
                reply = await session.post(f"{API}/announce", ann, AnnounceReply)
            except SchedulerRefused as e:
                if e.code == UNKNOWN_PEER:
                    raise  # forgotten already: the session registers again
                log.warning("scheduler refused pieces of %s: %s", meta.task_id, e)
                break
            if reply is not None:
                deferrals.deferred(meta.task_id, reply, ann)
