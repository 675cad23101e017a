"""The outbox: what the scheduler must hear of this peer's holdings — pieces gained, pieces
dropped, blobs whose digest failed, seals, lease progress — coalesced per task and sent in
the order it happened, one request at a time, held while no scheduler is connected.

A claim the scheduler defers (another peer's origin lease on the piece is live, or the map is
bound to another registry) is neither recorded nor blamed: it is announced again after a while,
a few times, so a piece fetched on the on-demand path ends up recorded as held once the lease
resolves. A claim it rejects (it conflicts with the map) is dropped.

A task's queued claims may also leave with the schedule call that asks for its next pieces
(`lend`: one call instead of two); what the outbox sends of that task meanwhile is only more
claims, never a withdrawal that could overtake them. While a reader of the task keeps asking
(a schedule call in the last RIDE_RECENT), its claims wait for the next call before going
alone: a fleet pull's peers then send about one call per piece fewer. How long is the claim's
source's (`ride_wait`): a piece fetched from the origin is the first copy, which every other
host waits for, and goes at once; a copy from a peer (the swarm has holders of it already)
waits up to RIDE_WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pydantic import BaseModel

from common.models import (
    Announce,
    AnnounceReply,
    BlobMismatch,
    LeaseProgress,
    PieceClaim,
    Withdraw,
)
from peer.sched_session import API, retry_backoff
from peer.sched_transport import SchedulerRefused, SchedulerUnavailable

log = logging.getLogger("naiad.peer.scheduler")
R = TypeVar("R", bound=BaseModel)
ANNOUNCE_BATCH = 4096
ANNOUNCE_COALESCE = 0.005
# Claims of a task being read wait this long for the reader's next schedule call to carry them
# (a 4 MiB piece takes 14 ms at 300 MB/s; the read-ahead asks every other piece): what holders
# others learn of is that much later, against fewer calls per piece. A copy from a peer waits
# RIDE_WAIT (the swarm holds the piece already: one more holder a little later); the first
# copy, from the origin, RIDE_WAIT_ORIGIN (every other host waits for it). Copies from peers
# waiting 60 or 100 ms halved or thirded the calls sent alone but slowed a fleet's pulls by
# 8-12 % (docs/benchmarks.md, issue 14, helper T6): kept at 30 ms.
RIDE_WAIT = 0.03
RIDE_WAIT_ORIGIN = 0.0
ORIGIN = "origin"  # a claim's source, as the engine counts its bytes: "origin" or "peer"
RIDE_RECENT = 0.25  # a task asked about this recently is being read
# Deferred claims are announced again after these waits (a lease resolves within seconds: its
# holder announces, or it lapses after the lease timeout and is taken over), then given up on;
# a re-registration announces everything held anyway.
DEFER_WAITS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


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
    due: float = 0.0  # when the first of `pieces` stops waiting for a schedule call

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


@dataclass
class _Deferred:
    """Claims of one task the scheduler deferred, waiting to be announced again."""

    pieces: dict[int, str]
    registry: str | None
    sealed: bool
    attempt: int
    due: float


def ride_wait(source: str) -> float:
    """How long a claim of a piece fetched from `source` waits for its reader's next
    schedule call to carry it."""
    return RIDE_WAIT_ORIGIN if source == ORIGIN else RIDE_WAIT


def ride_ends(due: float, asked: float | None) -> float | None:
    """Until when queued claims wait for the reader's next schedule call: the earliest of
    their deadlines (`due`: each claim's `ride_wait` after it was queued), and no longer than
    RIDE_RECENT after the reader last asked (`asked`); None: nobody reads the task, they do
    not wait."""
    if asked is None:
        return None
    return min(due, asked + RIDE_RECENT)


def announcements(peer_id: str, task_id: str, pieces: dict[int, str], sealed: bool,
                  progress: set[int], registry: str | None) -> list[Announce]:
    """Announcements of `pieces`, cut to the batch limit; the seal rides on the last."""
    items = sorted(pieces.items())
    out = []
    for k in range(0, max(1, len(items)), ANNOUNCE_BATCH):
        last = k + ANNOUNCE_BATCH >= len(items)
        out.append(Announce(
            peer_id=peer_id, task_id=task_id,
            pieces=[PieceClaim(index=i, chunk=c) for i, c in items[k:k + ANNOUNCE_BATCH]],
            sealed=sealed and last, registry=registry,
            progress=[LeaseProgress(epoch=e) for e in sorted(progress)] if last else []))
    return out


def messages(peer_id: str, task_id: str, p: _Pending) -> list[tuple[str, BaseModel]]:
    """A task's pending withdrawals, then its mismatch, then its announcements."""
    gone = sorted(p.withdrawn)
    batches = [None] if p.withdrawn_all else \
        [gone[k:k + ANNOUNCE_BATCH] for k in range(0, len(gone), ANNOUNCE_BATCH)]
    out: list[tuple[str, BaseModel]] = [
        (f"{API}/withdraw", Withdraw(peer_id=peer_id, task_id=task_id, pieces=batch))
        for batch in batches]
    if p.mismatch:
        out.append((f"{API}/mismatches", BlobMismatch(peer_id=peer_id, task_id=task_id,
                                                       registry=p.registry)))
    if p.pieces or p.sealed or p.progress:
        out += [(f"{API}/announce", a) for a in
                announcements(peer_id, task_id, p.pieces, p.sealed, p.progress, p.registry)]
    return out


class OutboxSession(Protocol):
    """What the outbox needs of the failover session (peer/sched_session.py)."""

    connected: asyncio.Event

    async def post(self, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0, session: int | None = None) -> R | None: ...


class Outbox:
    def __init__(self, peer_id: str, session: OutboxSession,
                 clock: Callable[[], float] = time.monotonic,
                 defer_waits: tuple[float, ...] = DEFER_WAITS) -> None:
        self.peer_id = peer_id
        self.session = session
        self.clock = clock
        self.defer_waits = defer_waits
        self._pending: dict[str, _Pending] = {}
        self._deferred: dict[str, _Deferred] = {}
        self.registries: dict[str, str] = {}  # task -> registry, for re-announcing
        self._wanted = asyncio.Event()
        self._round: set[str] = set()  # tasks whose messages are being sent now
        self._lent: dict[str, int] = {}  # task -> its announcements out with other calls
        self._asked: dict[str, float] = {}  # task -> when a schedule call last asked about it

    # -- what the engine queues ------------------------------------------------------------

    def announce(self, task_id: str, index: int, chunk: str,
                 registry: str | None = None, source: str = ORIGIN) -> None:
        """This peer holds piece `index` of a task now, fetched from `source` ("origin" or
        "peer": how long the claim may wait for a schedule call, `ride_wait`)."""
        p = self._pending.setdefault(task_id, _Pending())
        due = self.clock() + ride_wait(source)
        sooner = not p.pieces or due < p.due
        if sooner:
            p.due = due
        p.pieces[index] = chunk
        self._registry(task_id, p, registry)
        # A claim joining others that wait for the reader's next call, no sooner than the
        # first of them, changes nothing the sender waits for: no wake-up per piece.
        if sooner or self._ride_ends(task_id, p) is None:
            self._wanted.set()

    def withdraw(self, task_id: str, pieces: list[int] | None) -> None:
        """This peer no longer holds these pieces (None: the whole task) of a task. Queued with
        the announcements, so the scheduler hears of drops and gains in the order they
        happened."""
        self._pending.setdefault(task_id, _Pending()).withdraw(pieces)
        d = self._deferred.get(task_id)
        if d is not None:
            for i in (list(d.pieces) if pieces is None else pieces):
                d.pieces.pop(i, None)
            d.sealed = False  # a seal is for a task held whole
            if not d.pieces:
                del self._deferred[task_id]
        if pieces is None:
            self.registries.pop(task_id, None)
        self._wanted.set()

    def blob_mismatch(self, task_id: str, registry: str | None = None) -> None:
        """The blob assembled from these pieces failed its digest: every piece of it is
        withdrawn, and the scheduler told after that, before anything held since."""
        p = self._pending.setdefault(task_id, _Pending())
        self.withdraw(task_id, None)
        p.mismatch = True
        self._registry(task_id, p, registry)
        self._wanted.set()

    def progress(self, task_id: str, epoch: int) -> None:
        self._pending.setdefault(task_id, _Pending()).progress.add(epoch)
        self._wanted.set()

    def sealed(self, task_id: str, registry: str | None = None) -> None:
        p = self._pending.setdefault(task_id, _Pending())
        p.sealed = True
        self._registry(task_id, p, registry)
        self._wanted.set()

    def _registry(self, task_id: str, p: _Pending, registry: str | None) -> None:
        if registry is not None:
            p.registry = self.registries[task_id] = registry

    # -- deferred claims -------------------------------------------------------------------

    def deferred(self, task_id: str, reply: AnnounceReply, ann: Announce,
                 attempt: int = 0) -> None:
        """Keep the claims of `ann` that `reply` deferred, to announce them again later."""
        if not reply.deferred:
            return
        chunks = {c.index: c.chunk for c in ann.pieces}
        pieces = {i: chunks[i] for i in reply.deferred if i in chunks}
        if not pieces:
            return
        prior = self._deferred.get(task_id)
        if prior is not None:
            pieces = {**prior.pieces, **pieces}
            attempt = min(attempt, prior.attempt)
        if attempt >= len(self.defer_waits):
            log.info("scheduler still defers pieces %s of %s; giving up until the next "
                     "registration", sorted(pieces)[:10], task_id)
            self._deferred.pop(task_id, None)
            return
        self._deferred[task_id] = _Deferred(
            pieces=pieces, registry=ann.registry,
            sealed=ann.sealed or (prior is not None and prior.sealed), attempt=attempt,
            due=self.clock() + self.defer_waits[attempt])
        self._wanted.set()

    def _due(self) -> float | None:
        """Seconds until the next deferred claims are due, or claims waiting for a schedule
        call stop waiting (0: now); None: none wait."""
        dues = [d.due for d in self._deferred.values()]
        for task_id, p in self._pending.items():
            ends = None if self._held(task_id, p) else self._ride_ends(task_id, p)
            if ends is not None:
                dues.append(ends)
        return max(0.0, min(dues) - self.clock()) if dues else None

    def _take_due(self) -> dict[str, tuple[_Pending, int]]:
        """Deferred claims now due, as pending messages, with their attempt."""
        now = self.clock()
        out = {}
        for task_id, d in list(self._deferred.items()):
            if d.due <= now:
                del self._deferred[task_id]
                out[task_id] = (_Pending(pieces=dict(d.pieces), sealed=d.sealed,
                                         registry=d.registry), d.attempt + 1)
        return out

    # -- claims that leave with a schedule call ------------------------------------------------

    def lend(self, task_id: str) -> Announce | None:
        """The task's queued claims as one announcement for a call about to go out, or None:
        nothing queued, or what must go first (a withdrawal, a mismatch) or is under way. The
        caller hands it back with `answered` or `unsent`."""
        self._asked[task_id] = self.clock()
        p = self._pending.get(task_id)
        if p is None or task_id in self._round or p.withdrawn or p.withdrawn_all \
                or p.mismatch or len(p.pieces) > ANNOUNCE_BATCH \
                or not (p.pieces or p.sealed or p.progress):
            return None
        del self._pending[task_id]
        self._lent[task_id] = self._lent.get(task_id, 0) + 1
        [ann] = announcements(self.peer_id, task_id, p.pieces, p.sealed, p.progress,
                              p.registry)
        return ann

    def answered(self, ann: Announce, reply: AnnounceReply) -> None:
        """The scheduler's answer to a lent announcement: as if the outbox had sent it."""
        self._returned(ann.task_id)
        self._answered(ann, reply, 0)

    def unsent(self, ann: Announce) -> None:
        """A lent announcement that did not get through: queued again, before what came
        since."""
        self._returned(ann.task_id)
        self.requeue(ann.task_id, _Pending(
            pieces={c.index: c.chunk for c in ann.pieces}, sealed=ann.sealed,
            progress={p.epoch for p in ann.progress}, registry=ann.registry))

    def _returned(self, task_id: str) -> None:
        left = self._lent.pop(task_id, 1) - 1
        if left:
            self._lent[task_id] = left
        self._wanted.set()  # what waited for it may go now

    def _ride_ends(self, task_id: str, p: _Pending) -> float | None:
        """Until when a task's claims wait for the schedule call its reader makes next; None:
        they do not (not being read, or more than claims: a seal, a withdrawal or a mismatch
        goes at once)."""
        asked = self._asked.get(task_id)
        if not p.pieces or p.sealed or p.mismatch or p.withdrawn \
                or p.withdrawn_all:
            return None
        return ride_ends(p.due, asked)

    def _riding(self, task_id: str, p: _Pending, now: float) -> bool:
        ends = self._ride_ends(task_id, p)
        return ends is not None and now < ends

    def _held(self, task_id: str, p: _Pending) -> bool:
        """Whether a task's messages wait for its lent announcements to be answered: a
        withdrawal or a mismatch must not overtake claims made before it."""
        return task_id in self._lent and (p.withdrawn_all or bool(p.withdrawn) or p.mismatch)

    # -- sending ---------------------------------------------------------------------------

    def requeue(self, task_id: str, p: _Pending) -> None:
        """Put back messages that could not be sent, before whatever queued since."""
        mine = self._pending.setdefault(task_id, _Pending())
        kept = {i: c for i, c in p.pieces.items() if not mine.withdraws(i)}
        if kept:
            mine.due = min(mine.due, p.due) if mine.pieces else p.due
        mine.pieces = {**kept, **mine.pieces}
        mine.progress |= p.progress
        mine.registry = mine.registry or p.registry
        mine.mismatch |= p.mismatch
        mine.sealed |= p.sealed and not (mine.withdrawn or mine.withdrawn_all)
        mine.withdrawn_all |= p.withdrawn_all
        mine.withdrawn = set() if mine.withdrawn_all else mine.withdrawn | p.withdrawn
        self._wanted.set()

    async def _wait(self) -> None:
        """Until there is something to send: queued messages, or deferred claims due."""
        while not self._wanted.is_set():
            due = self._due()
            if due is not None and due <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), due)

    async def run(self) -> None:
        """Send what accumulated since the last send; one request in flight at a time, so a
        burst of pieces becomes a few batches. While no scheduler answers, messages wait for
        one (a failover takes a moment; the pieces' leases should not lapse meanwhile)."""
        retry = retry_backoff()
        while True:
            await self._wait()
            await asyncio.sleep(ANNOUNCE_COALESCE)  # a burst of pieces becomes one request
            await self.session.connected.wait()
            self._wanted.clear()
            now = self.clock()
            self._asked = {t: a for t, a in self._asked.items() if now - a < RIDE_RECENT}
            batch = {t: (p, 0) for t, p in self._pending.items()
                     if not self._held(t, p) and not self._riding(t, p, now)}
            self._pending = {t: p for t, p in self._pending.items() if t not in batch}
            for task_id, (p, attempt) in self._take_due().items():
                if task_id in batch:  # a fresh claim of the same piece wins
                    fresh = batch[task_id][0]
                    fresh.pieces = {**p.pieces, **fresh.pieces}
                    fresh.sealed |= p.sealed
                    fresh.registry = fresh.registry or p.registry
                else:
                    batch[task_id] = (p, attempt)
            unsent = dict(batch)
            self._round = set(batch)
            try:
                for task_id, (p, attempt) in batch.items():
                    await self._send(task_id, p, attempt)
                    del unsent[task_id]
                    self._round.discard(task_id)
            except SchedulerUnavailable as e:
                # Sent again once a scheduler answers: at once after a failover, after a
                # growing wait while the one in use says it is unavailable.
                log.info("announcements held: %s", e)
                await asyncio.sleep(retry.delay())
            else:
                retry.reset()
            finally:
                # Whatever ended this round (a failure, a cancellation) loses nothing queued.
                self._round = set()
                for task_id, (p, _) in unsent.items():
                    self.requeue(task_id, p)

    async def _send(self, task_id: str, p: _Pending, attempt: int) -> None:
        for path, msg in messages(self.peer_id, task_id, p):
            announcing = isinstance(msg, Announce)
            try:
                reply = await self.session.post(path, msg, AnnounceReply if announcing else None)
            except SchedulerRefused as e:
                log.info("%s refused: %s", path.rsplit("/", 1)[1], e)
                if announcing:
                    return
                continue
            if isinstance(reply, AnnounceReply) and isinstance(msg, Announce):
                self._answered(msg, reply, attempt)

    def _answered(self, ann: Announce, reply: AnnounceReply, attempt: int) -> None:
        if reply.rejected:
            log.warning("scheduler rejected pieces %s of %s", reply.rejected[:10], ann.task_id)
        self.deferred(ann.task_id, reply, ann, attempt)
