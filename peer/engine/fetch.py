"""A piece from its ranked parents in turn, verified before anything else sees it: hashed by
the keeper (`VerifyingKeep`) in the same worker hand-off as the store's write, nothing stored,
counted or announced unless it is the chunk asked for.

A parent at its upload slots (`busy`) is skipped without blame; one that failed, stalled or
sent bytes that do not hash to the chunk id is reported to the scheduler (unless the parents
are the last-known holders tried without one) and returned among the failed, so the next round
excludes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Protocol

from common.limits import DEFAULT, PrioritySlots
from common.metrics import PeerMetrics
from common.models import ParentRef
from peer.engine.run import TaskRun
from peer.engine.seams import ChunkSource, Decider
from peer.parents import ParentError, address
from peer.store import ChunkCorrupt

log = logging.getLogger("naiad.peer.engine")

PARENT_FETCHES = 32  # concurrent piece fetches from parents, all tasks


class VerifyingKeep(Protocol):
    """Keep a piece (`Engine._keep`): with `verify`, its bytes are hashed first and
    ChunkCorrupt raised, nothing kept, unless they are `chunk`."""

    def __call__(self, run: TaskRun, index: int, chunk: str, data: bytes, source: str,
                 verify: bool = False) -> Awaitable[None]: ...


class ParentFetch:
    def __init__(self, peer_id: str, parents: ChunkSource, decider: Decider,
                 keep: VerifyingKeep, metrics: PeerMetrics,
                 slots: int = PARENT_FETCHES) -> None:
        self.peer_id = peer_id
        self.parents = parents
        self.decider = decider
        self.keep = keep
        self.metrics = metrics
        self.slots = PrioritySlots(slots)

    async def piece(self, run: TaskRun, index: int, chunk: str, parents: list[ParentRef],
                    report: bool = True) -> tuple[bytes | None, set[str]]:
        """Try the parents in order; return the verified bytes and the parents that failed."""
        _, size = run.layout.span(index)
        failed: set[str] = set()
        priority = run.priority.get(index, DEFAULT)
        for parent in parents:
            if parent.id == self.peer_id:
                continue
            started = time.perf_counter()
            try:
                async with self.slots.hold(priority):
                    data = await self.parents.fetch(address(parent), chunk, size, priority)
            except ParentError as e:
                if e.kind != "busy":
                    failed.add(parent.id)
                    if report:
                        self.decider.report(parent.id, run.task_id, index, e.kind)
                continue
            try:
                await self.keep(run, index, chunk, data, "peer", verify=True)
            except ChunkCorrupt:
                self.metrics.verify_failures.inc()
                log.warning("parent %s sent corrupt piece %d of %s", parent.id, index,
                            run.task_id)
                failed.add(parent.id)
                self.decider.report(parent.id, run.task_id, index, "corrupt")
                continue
            self.metrics.piece_seconds.labels("peer").observe(time.perf_counter() - started)
            return data, failed
        return None, failed
