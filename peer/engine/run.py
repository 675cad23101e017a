"""What the engine knows about one task while this process runs, and how a read of it fails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.models import ParentRef, TaskMeta
from common.pieces import PieceLayout
from peer.origin import OriginError, OriginRequest

if TYPE_CHECKING:
    from peer.engine.batcher import DecisionBatcher


class PieceUnavailable(Exception):
    """A piece could be obtained from neither parents nor the origin."""


class BlobCorrupt(Exception):
    """The assembled blob does not match its digest."""


class LengthConflict(OriginError):
    """The origin gives a blob this peer verified against its digest another length."""


@dataclass
class OriginRun:
    """One ranged origin request covering pieces first..last."""

    first: int
    last: int
    pieces: dict[int, asyncio.Future[bytes]]
    failed: bool = False


@dataclass
class TaskRun:
    """What the engine knows about one task while this process runs.

    `origin`: the registry the run fetches from (and announces its pieces as coming from),
    with the latest credentials one of its clients gave. `direct`: a read for a client of
    another registry while this peer has not proven the blob: straight from that registry,
    neither stored nor shared."""

    meta: TaskMeta
    origin: OriginRequest
    have: dict[int, str]
    direct: bool = False
    indexed: bool = False  # the store's index holds the task with this layout
    inflight: dict[int, asyncio.Future[bytes]] = field(default_factory=dict)
    decided: dict[int, asyncio.Future[tuple[str, str | None]]] = field(default_factory=dict)
    known: dict[int, tuple[str, list[ParentRef]]] = field(default_factory=dict)
    origin_runs: dict[int, OriginRun] = field(default_factory=dict)
    batcher: DecisionBatcher | None = None
    priority: dict[int, int] = field(default_factory=dict)  # of pieces in flight
    sealing: bool = False
    prefetching: bool = False
    readers: int = 0
    # Clients' opens and the reads they began: from an open to its read the task is not yet
    # being read, and eviction must not pull the files from under it (`held`).
    opened_at: float = float("-inf")  # the last open, monotonic
    opens: int = 0
    reads: int = 0

    def opened(self, now: float) -> None:
        self.opens += 1
        self.opened_at = now

    def held(self, now: float, hold: float) -> bool:
        """An open whose read has not begun, within `hold` seconds of the last open (a client
        that never reads holds it no longer)."""
        return self.reads < self.opens and now - self.opened_at < hold
    hashing: int = 0  # whole-blob readers hashing as they go: one of them seals the task
    awaited: dict[int, list[float]] = field(default_factory=dict)  # piece -> readers' waits

    @contextlib.contextmanager
    def awaiting(self, index: int, now: float) -> Iterator[None]:
        """A reader waits for piece `index` from `now` on meanwhile (outage_wait reads since
        when)."""
        starts = self.awaited.setdefault(index, [])
        starts.append(now)
        try:
            yield
        finally:
            starts.remove(now)
            if not starts:
                del self.awaited[index]

    def awaited_since(self, index: int) -> float | None:
        starts = self.awaited.get(index)
        return starts[0] if starts else None

    @property
    def busy(self) -> bool:
        """Being read or fetched: its chunks must not be evicted."""
        return bool(self.readers or self.inflight or self.prefetching)

    @property
    def task_id(self) -> str:
        return self.meta.task_id

    @property
    def layout(self) -> PieceLayout:
        return PieceLayout(self.meta.length, self.meta.piece_size)

    @property
    def complete(self) -> bool:
        return len(self.have) >= self.layout.count


@dataclass(frozen=True)
class Plan:
    """Where the bytes of a read are expected to come from, when its headers go out."""

    source: str  # local, peer, origin or mixed
    origin_reasons: tuple[str, ...]
