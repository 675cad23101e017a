"""The scheduler's cluster state and its rules, in memory and without I/O.

Peers register, heartbeat and expire; tasks record which peer holds which piece as which chunk;
leases give one peer at a time the right to fetch a run of pieces from the origin. Every method
takes `now` so tests drive time by hand. The HTTP layer (`scheduler.api`) is a thin adapter.

These methods are the only copy of the rules. `MemoryStore` keeps one `ClusterState` for the
life of the process; `RedisStore` builds a small one for each call, holding just the peers, tasks
and pieces that call touches (read from Redis), runs the same method on it and writes back what
changed, atomically. So a rule reads and writes state only through `peers`, `tasks`,
`cordoned`, `totals` and `back_to_source`, and looks up by key what it needs rather than
scanning (a scan is fine where a store can load everything: leave, expire, blob mismatch).
"""

from __future__ import annotations

import math
import random
import types
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from common.models import (
    Announce,
    AnnounceReply,
    Decision,
    Heartbeat,
    ParentRef,
    PeerCounters,
    PeerLoad,
    PeerRegistration,
    Report,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
    Withdraw,
)
from common.pieces import MiB, PieceLayout, default_piece_size, piece_count
from scheduler import policy

PARENTS_PER_PIECE = 3
# Children in flight per usable holder of a piece. When many peers want a piece few hold, the
# rest wait for the first children to finish and become holders themselves: the piece spreads
# as a tree (1, 3, 9, ... holders), every uplink busy, instead of a star on its first holder.
# One child at a time (1, 2, 4, 8: its holder's whole uplink) with a 128 MiB reader window gave
# bench.sim kraken 50 hosts 1.95x -> 1.35x the bound (helper K, `--report`), but 1.4-3x the
# long-poll waits at the scheduler: bench.fleet memory 3,630-3,784 -> 2,627-2,680 pieces per
# CPU-second and on Redis 2,118 -> 1,583 with 19 of 64 pulls done in 30 s, not 63 (2026-12-02).
# Kept at two until waits are cheap (docs/benchmarks.md, "What holds a crowd back").
CHILDREN_PER_HOLDER = 2
# Holders of a piece weighed for one decision: a random sample of this many when there are more
# (Dragonfly samples its candidate parents the same way). Weighing every holder made a decision
# cost linear in the swarm: 0.06 ms with 8 holders, 12.7 ms with 2,600 (a fleet pull's late
# pieces), in the memory store's rule alone.
HOLDER_SAMPLE = 24
MAX_LEASE_PIECES = 16
MAX_LEASE_BYTES = 64 * MiB
# Origin streams a task's leases are spread over while other peers take part in it: a requester
# holds live leases for at most a run's 1/LEASE_SPREAD pieces, and the rest of what it asks
# waits for another requester to lease (or a holder). Leased in whole runs, every host wanting
# the same pieces in order made the origin send to one lease holder at a time, at that host's
# downlink (bench.sim kraken: 300 MB/s of a 10 Gbit/s origin), and each piece then spread from
# that one holder while every host wanted the same next ones. 0: whole runs (off).
LEASE_SPREAD = 4
# A task's origin leases stay in one IDC at a time: a requester with an IDC label leases no
# piece while a peer of another IDC holds a live lease of the task, and waits (`lease-idc`)
# for that IDC's copy instead. Each piece leased outside the origin's IDC crosses into the
# origin's and into every other; with leases in every IDC in turn (a whole read's spread
# share, ask_plan.py) bench.sim idc3 60 hosts sent 2.66x the blob across IDCs, 2.00x with
# them kept in one. Nobody knows the origin's IDC: the one leasing first keeps it while it
# leases, as in-order reads kept it anyway. Off by default (stop 26, lead) with the spread
# share it serves (peer/engine/ask_plan.py SPREAD_IDC): on, a labelled ranged or on-demand
# reader of a piece the leasing IDC never reads waits until its own stall timeout (1-5 s,
# peer/engine/acquire.py) while another IDC pulls the task, for no gain while labelled peers
# read in order. True with `bench.sim --experiment spread-idc`.
LEASE_IDC = False
# A lease whose holder is under a penalty (a child reported it) lapses once its progress is
# older than this: a holder's engine reports progress every 0.5 s (peer/engine/origin.py
# PROGRESS_EVERY), coalesced by its outbox for up to ~30 ms, so a live holder falsely reported
# keeps its lease.
SUSPECT_LEASE_QUIET = 0.75
# "mismatch": authored chunk ids of a map whose assembled blob failed its digest.
PENALTY_SECONDS = {"failed": 5.0, "slow": 10.0, "corrupt": 60.0, "conflict": 60.0,
                   "mismatch": 60.0}
# A map is sealed once this many distinct peers announced that the blob they assembled from it
# matched its sha256: one member alone cannot forge a seal.
CONFIRMATIONS_TO_SEAL = 2
RESET_EVERY = 60.0  # a reporter's blob mismatch resets a task's map at most this often
SILENT_HEARTBEATS = 3  # a peer silent for this many heartbeat intervals is gone


def expiry_seconds(heartbeat_interval: float) -> float:
    return SILENT_HEARTBEATS * heartbeat_interval


class StateError(Exception):
    status = 400


class UnknownPeer(StateError):
    status = 404


class UnknownTask(StateError):
    status = 404


class Conflict(StateError):
    status = 409


@dataclass
class PeerState:
    reg: PeerRegistration
    registered_at: float
    last_seen: float
    load: PeerLoad = field(default_factory=PeerLoad)
    counters: PeerCounters = field(default_factory=PeerCounters)
    cordoned: bool = False
    penalty_until: float = 0.0
    penalty_reason: str = ""
    handouts: float = 0.0
    handouts_at: float = 0.0
    tasks: set[str] = field(default_factory=set)
    # What the policy weighs of this peer, built once for this registration and load report
    # (the `is` keys) and refreshed per decision only in what moves: its decayed handouts and
    # whether it holds the whole task. Cache only: never stored (scheduler/redis/records.py).
    candidate: tuple[PeerRegistration, PeerLoad, policy.Candidate] | None = field(
        default=None, repr=False, compare=False)
    # How a decision names this peer as a parent, by transport, for this registration: a
    # validated ParentRef cost ~2 us, three per admitted decision. Cache only, like `candidate`.
    refs: tuple[PeerRegistration, dict[int, ParentRef]] | None = field(
        default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.reg.id

    def penalised(self, now: float) -> bool:
        return now < self.penalty_until


@dataclass
class Lease:
    holder: str
    epoch: int
    first: int
    last: int
    progress_at: float


class Holders(set[str]):
    """A piece's holders: a set that iterates in its ids' sorted order and keeps that order as
    a list from one mutation to the next (`add` and `discard` insert into it and delete from
    it in place). Every sampled decision (HOLDER_SAMPLE of more holders) draws from that list,
    and copying 2,600 ids for each one cost ~20 us; a crowd decides a piece several times
    between two of its announcements. Sorted, not the set's own order: that follows the
    process's string hashing (PYTHONHASHSEED), and so did every draw and every tie the policy
    broke in it (bench.sim's same seed gave 1.51-1.79x over 16 hashings).

    It also keeps how many of them are in each IDC (`idcs`), counted once and then kept by
    `add`, `discard` and `remove` (an announcement, a withdrawal, a peer gone); any other
    change in place, or another `idc_of`, has them counted again when next asked."""

    __slots__ = ("_idc_of", "_idcs", "_order")

    def __init__(self, *args: Iterable[str]) -> None:
        super().__init__(*args)
        self._order: list[str] | None = None
        self._idcs: dict[str, int] | None = None
        self._idc_of: Callable[[str], str] | None = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.ordered())

    def ordered(self) -> list[str]:
        """The holders as a list, sorted; not to be changed."""
        order = self._order
        if order is None:
            order = self._order = sorted(set.__iter__(self))
        return order

    def idcs(self, idc_of: Callable[[str], str]) -> dict[str, int]:
        """How many holders each IDC has ("": no IDC), by `idc_of` (a holder's IDC; the same
        function from call to call keeps the counts); not to be changed."""
        counts = self._idcs
        if counts is None or self._idc_of is not idc_of:
            counts = {}
            for holder in set.__iter__(self):
                idc = idc_of(holder)
                counts[idc] = counts.get(idc, 0) + 1
            self._idcs, self._idc_of = counts, idc_of
        return counts

    def add(self, peer: str) -> None:
        if peer in self:
            return
        order = self._order
        if order is not None:
            insort(order, peer)
        counts = self._idcs
        if counts is not None:
            idc = self._idc_of(peer)  # type: ignore[misc]
            counts[idc] = counts.get(idc, 0) + 1
        set.add(self, peer)

    def discard(self, peer: str) -> None:
        if peer not in self:
            return
        order = self._order
        if order is not None:
            del order[bisect_left(order, peer)]
        counts = self._idcs
        if counts is not None:
            idc = self._idc_of(peer)  # type: ignore[misc]
            left = counts.get(idc, 0) - 1
            if left > 0:
                counts[idc] = left
            elif left == 0:
                del counts[idc]
            else:  # its IDC is not the one it was counted in: count them all again
                self._idcs = None
        set.discard(self, peer)

    def remove(self, peer: str) -> None:
        if peer not in self:
            raise KeyError(peer)
        self.discard(peer)

    def pop(self) -> str:
        """The first holder in order (a plain set's `pop` takes one by its hash)."""
        if not self:
            raise KeyError("pop from an empty set")
        peer = self.ordered()[0]
        self.discard(peer)
        return peer


SET_MUTATORS = ("add", "discard", "remove", "pop", "clear", "update", "difference_update",
                "intersection_update", "symmetric_difference_update", "__ior__", "__iand__",
                "__isub__", "__ixor__")


def on_mutation(cls: type[set[str]], before: Callable[[Any], None],
                names: Iterable[str] = SET_MUTATORS) -> None:
    """Make every in-place mutator of the set subclass `cls` (of `names`) call `before(self)`
    first."""
    for name in names:
        mutator = getattr(set, name)

        def mutate(self: Any, *args: Any, _mutator: Callable[..., Any] = mutator) -> Any:
            before(self)
            return _mutator(self, *args)
        mutate.__name__ = name
        setattr(cls, name, mutate)


def _drop_order(holders: Holders) -> None:
    holders._order = None
    holders._idcs = None


# Every other mutator drops the list and the counts, sorted and counted again when next asked
# (add, discard, remove and pop keep both themselves).
on_mutation(Holders, _drop_order,
            [n for n in SET_MUTATORS if n not in ("add", "discard", "remove", "pop")])


class Children(dict[str, float]):
    """A piece's children (peer -> when it was handed the piece), kept so that nothing about
    them is walked per decision: oldest handout first (handed again, a child moves to the end)
    and none a holder of the piece (a child that announces it leaves; a holder asking again is
    admitted without becoming one). So whether every child is in flight is whether the oldest
    is, and the stale ones are a prefix, dropped once. A crowd's every `holders-busy` walked
    a piece's children twice (`min` of their times, the holders' disjointness: 14.7 % of
    bench.sim kraken at 2,600 hosts). `ordered` turns False if handouts ever go back in time
    (a test's clock): then they are walked as a plain dict's (the Redis store loads those).
    """

    __slots__ = ("latest", "ordered")

    def __init__(self) -> None:
        super().__init__()
        self.latest = -math.inf
        self.ordered = True

    def hand(self, peer: str, now: float) -> None:
        """`peer` is a child from `now`."""
        self.pop(peer, None)
        self[peer] = now
        if now < self.latest:
            self.ordered = False
        else:
            self.latest = now

    def drop_stale(self, now: float, lease_timeout: float) -> None:
        """Forget the children handed out a lease timeout ago or more (no longer in flight)."""
        stale = []
        for peer, since in self.items():
            if now - since < lease_timeout:
                break
            stale.append(peer)
        for peer in stale:
            del self[peer]


@dataclass
class PieceState:
    chunk: str | None = None
    # A plain set is fine too (the Redis store loads one): only a `Holders` keeps its list.
    holders: set[str] = field(default_factory=Holders)
    # Peers sent to fetch this piece from a holder, and when: children in flight, who will be
    # holders soon. None until the first (most pieces of a big cluster never need it). The
    # rules make a `Children`; a plain dict (the Redis store's) is read the same, walked.
    children: dict[str, float] | None = None


class TaskTrust(BaseModel):
    """Who vouches for a task's piece map; kept with the task (in Redis, one JSON field).

    `registry`: the registry an unsealed map is bound to, set by its first lease or chunk id;
    None: unbound. A peer that names no registry (an older one) is bound by nothing and binds
    nothing. `authors`: the peers whose claims first set a piece's chunk id. `confirmed`: the
    peers that announced the blob's sha256 matched while holding every piece of this map.
    `resets`: reporter -> when its mismatch last reset the map.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    registry: str | None = None
    authors: tuple[str, ...] = ()
    confirmed: tuple[str, ...] = ()
    resets: dict[str, float] = {}

    def foreign(self, registry: str | None, sealed: bool) -> bool:
        """Whether a peer of `registry` is outside this map: an unsealed map bound elsewhere."""
        return not sealed and None not in (registry, self.registry) and self.registry != registry


@dataclass
class TaskState:
    meta: TaskMeta
    created_at: float
    pieces: dict[int, PieceState] = field(default_factory=dict)
    leases: dict[int, Lease] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)  # peer -> number of pieces it holds
    next_epoch: int = 1
    trust: TaskTrust = field(default_factory=TaskTrust)

    @property
    def layout(self) -> PieceLayout:
        return PieceLayout(self.meta.length, self.meta.piece_size)

    @property
    def piece_count(self) -> int:  # layout.count, without building a layout on a hot path
        return piece_count(self.meta.length, self.meta.piece_size)

    def complete_holders(self) -> set[str]:
        n = self.piece_count
        return {p for p, c in self.held.items() if c >= n}


@dataclass
class Totals:
    """Cluster byte counters that never go backwards and never count a byte twice.

    Each peer process (a peer id and its start time) reports cumulative counters. The total grows
    by what a report adds over the previous report of the same process; a new process counts from
    zero (its predecessor's bytes stay counted); a report from a process already replaced, or a
    lower value from the same process (reports reordered between scheduler replicas), adds
    nothing. The last report of every peer is kept, whether it is live, expired or gone, so a
    peer that expires and comes back is not counted again. The total is kept as a running sum so
    that a store can apply one report knowing only that peer's previous one.
    """

    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTER_FIELDS, 0))
    last: dict[str, PeerCounters] = field(default_factory=dict)  # peer id -> latest process

    def report(self, peer_id: str, counters: PeerCounters) -> None:
        prev = self.last.get(peer_id)
        if prev is None or counters.started_at > prev.started_at:
            self.last[peer_id] = counters
            for k in _COUNTER_FIELDS:
                self.total[k] += getattr(counters, k)
            return
        if counters.started_at < prev.started_at:
            return  # a late report from a process already replaced
        grown = {}
        for k in _COUNTER_FIELDS:
            old, new = getattr(prev, k), getattr(counters, k)
            if new > old:
                self.total[k] += new - old
                grown[k] = new
        if grown:
            self.last[peer_id] = prev.model_copy(update=grown)

    def sums(self) -> dict[str, int]:
        return dict(self.total)


_COUNTER_FIELDS = ("origin", "peer", "local", "served", "uploaded")


class Room:
    """The room an announced piece has (`ClusterState.room`) when its holders are in IDCs:
    how many more children it may be handed now depends on the requester's IDC, as its parent
    choice sees it (`ClusterState._parents`). A requester of an IDC with holders is offered
    only those: its share is CHILDREN_PER_HOLDER of theirs, less every child in flight. One
    of an IDC without holders crosses into it once: the first while no copy into it is in
    flight, then none (`idc-copy-in-flight`). One without an IDC shares every holder's.
    Counted as every holder's, a piece looked roomy to an IDC with none left, and its
    requesters were woken to decide `holders-busy` again (bench.fleet, 4 IDCs).

    `take(peer)`: whether a call of `peer` may be admitted after those taken before it
    (each admitted takes a child's place, whatever its IDC); `spent()`: nobody may."""

    __slots__ = ("_copies", "_counts", "_crossed", "_live", "_share", "_state", "_taken")

    def __init__(self, state: ClusterState, counts: dict[str, int], share: int,
                 live: dict[str, float]) -> None:
        self._state = state
        self._counts = counts  # holders by IDC ("": none); not to be changed
        self._share = share  # CHILDREN_PER_HOLDER x every holder
        self._live = live  # the children in flight
        self._taken = len(live)
        self._copies: set[str] | None = None  # IDCs a child in flight is of, once asked
        self._crossed: set[str] = set()

    def spent(self) -> bool:
        return self._taken >= self._share

    def take(self, peer: str | None) -> bool:
        if self._taken >= self._share:
            return False
        idc = self._state.idc_of(peer) if peer is not None else ""
        if idc:
            near = self._counts.get(idc)
            if near:
                if self._taken >= CHILDREN_PER_HOLDER * near:
                    return False
            else:
                if idc in self._crossed or idc in self._copying():
                    return False
                self._crossed.add(idc)
        self._taken += 1
        return True

    def _copying(self) -> set[str]:
        copies = self._copies
        if copies is None:
            idc_of = self._state.idc_of
            copies = self._copies = {idc_of(c) for c in self._live}
        return copies


class ClusterState:
    def __init__(self, *, heartbeat_interval: float = 2.0, lease_timeout: float = 2.0,
                 rng: random.Random | None = None) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.lease_timeout = lease_timeout
        self.peers: dict[str, PeerState] = {}
        self.tasks: dict[str, TaskState] = {}
        self.cordoned: set[str] = set()  # survives a cordoned peer's re-registration
        self.totals = Totals()
        self.back_to_source = 0
        self.rng = rng or random.Random()
        # One bound method, the key of every `Holders.idcs` count: a peer's IDC changing (its
        # holdings kept) makes a new one, so each piece counts its holders again when next
        # asked (a rule does not walk the tasks a store may not have loaded).
        self.idc_of: Callable[[str], str] = types.MethodType(ClusterState.idc_of, self)

    # -- peers -----------------------------------------------------------------------------

    def register(self, reg: PeerRegistration, now: float) -> PeerState:
        """Register a peer, or again. The same process (failing over, or forgotten) keeps its
        holdings; a new process of the peer starts with none: it may have dropped chunks at
        start-up, and it re-announces what its store holds."""
        old = self.peers.get(reg.id)
        if old is not None:
            if reg.started_at and reg.started_at != old.reg.started_at:
                self._drop_holdings(old)
                old.registered_at = now
            elif reg.idc != old.reg.idc:  # the same holdings, in another IDC
                self.idc_of = types.MethodType(ClusterState.idc_of, self)
            old.reg, old.last_seen = reg, now
            return old
        peer = PeerState(reg=reg, registered_at=now, last_seen=now,
                         cordoned=reg.id in self.cordoned)
        self.peers[reg.id] = peer
        return peer

    def heartbeat(self, peer_id: str, hb: Heartbeat, now: float) -> None:
        peer = self._peer(peer_id)
        peer.last_seen = now
        load = hb.load
        if not load.upload_rate and hb.counters.started_at == peer.counters.started_at:
            rate = self._upload_rate(peer, hb)
            if rate:
                load = load.model_copy(update={"upload_rate": rate})
        peer.load = load
        peer.counters = hb.counters
        self.totals.report(peer_id, hb.counters)

    def _upload_rate(self, peer: PeerState, hb: Heartbeat) -> float:
        """What `peer` uploads at while it has uploads, bytes/s (policy.SLOW_SHARE): the
        bytes its last interval added to its counter, if it had uploads at both ends of it
        (else the last estimate stands; 0.0: none yet). Peers count a piece once sent, so
        uploads running all interval with none finished are slow (policy.STALLED_RATE)."""
        if not min(peer.load.active_uploads, hb.load.active_uploads):
            return peer.load.upload_rate
        sent = hb.counters.uploaded - peer.counters.uploaded
        return max(policy.STALLED_RATE, sent / self.heartbeat_interval)

    def leave(self, peer_id: str) -> None:
        self._drop_peer(self._peer(peer_id))

    def expire(self, now: float) -> list[str]:
        """Drop peers silent for three heartbeat intervals; their pieces stop being handed out."""
        deadline = now - expiry_seconds(self.heartbeat_interval)
        gone = [p for p in self.peers.values() if p.last_seen < deadline]
        for peer in gone:
            self._drop_peer(peer)
        return [p.id for p in gone]

    def cordon(self, peer_id: str) -> None:
        self.cordoned.add(peer_id)
        if peer_id in self.peers:
            self.peers[peer_id].cordoned = True

    def uncordon(self, peer_id: str) -> None:
        if peer_id not in self.cordoned and peer_id not in self.peers:
            raise UnknownPeer(f"unknown peer {peer_id}")
        self.cordoned.discard(peer_id)
        if peer_id in self.peers:
            self.peers[peer_id].cordoned = False

    def _drop_peer(self, peer: PeerState) -> None:
        self._drop_holdings(peer)
        del self.peers[peer.id]

    def _drop_holdings(self, peer: PeerState) -> None:
        for task_id in peer.tasks:
            task = self.tasks.get(task_id)
            if task is None:
                continue
            for piece in task.pieces.values():
                piece.holders.discard(peer.id)
            task.held.pop(peer.id, None)
        peer.tasks = set()

    def _peer(self, peer_id: str) -> PeerState:
        peer = self.peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(f"unknown peer {peer_id}: register first")
        return peer

    # -- tasks -----------------------------------------------------------------------------

    def ensure_task(self, req: TaskRequest, now: float) -> TaskMeta:
        task = self.tasks.get(req.task_id)
        if task is not None:
            if task.meta.length != req.length:
                raise Conflict(f"task {req.task_id} has length {task.meta.length}, "
                               f"not {req.length}")
            return task.meta
        meta = TaskMeta(task_id=req.task_id, length=req.length,
                        piece_size=req.piece_size or default_piece_size(req.length),
                        digest=req.digest or (req.task_id if req.task_id.startswith("sha256:")
                                              else None))
        self.tasks[req.task_id] = TaskState(meta=meta, created_at=now)
        return meta

    def _task(self, task_id: str) -> TaskState:
        task = self.tasks.get(task_id)
        if task is None:
            raise UnknownTask(f"unknown task {task_id}")
        return task

    def announce(self, ann: Announce, now: float) -> AnnounceReply:
        peer = self._peer(ann.peer_id)
        task = self._task(ann.task_id)
        count = task.piece_count
        peer.last_seen = now
        # A peer of another registry than an unsealed map's holds bytes of its own origin:
        # where they agree with the map it is a holder; where not, neither recorded nor blamed.
        foreign = task.trust.foreign(ann.registry, task.meta.sealed)
        accepted, rejected, deferred = 0, [], []
        gained = 0  # pieces newly held by the announcer, added to its count once
        authored = False
        for claim in ann.pieces:
            if claim.index >= count:
                rejected.append(claim.index)
                continue
            piece = task.pieces.get(claim.index)
            if piece is None and foreign:
                deferred.append(claim.index)
                continue
            if piece is None:
                piece = task.pieces[claim.index] = PieceState()
            lease = task.leases.get(claim.index)
            if piece.chunk is None and lease is not None and lease.holder != ann.peer_id \
                    and self._lease_live(lease, now):
                # The provisional chunk id comes from the lease holder's origin fetch; a claim
                # made before it is not recorded (nor blamed).
                deferred.append(claim.index)
                continue
            if piece.chunk is None and foreign:
                deferred.append(claim.index)
                continue
            if piece.chunk is None:
                piece.chunk = claim.chunk
                authored = True
            elif piece.chunk != claim.chunk:
                # A sealed map was confirmed by several peers' blob digests; a provisional one
                # was set by the first origin fetch. A claim against either, sealed or not, is
                # refused and its maker flagged: only a blob mismatch resets a map.
                (deferred if foreign else rejected).append(claim.index)
                continue
            if ann.peer_id not in piece.holders:
                piece.holders.add(ann.peer_id)
                gained += 1
                if type(piece.children) is Children:  # a child no more
                    piece.children.pop(ann.peer_id, None)
            lease = task.leases.pop(claim.index, None)
            if lease is not None and lease.holder == ann.peer_id:
                lease.progress_at = now
            accepted += 1
        if gained:
            task.held[ann.peer_id] = task.held.get(ann.peer_id, 0) + gained
        if rejected:
            self._penalise(peer, "conflict", now)
        if ann.pieces or ann.sealed:
            peer.tasks.add(ann.task_id)
        for p in ann.progress:
            for lease in task.leases.values():
                if lease.epoch == p.epoch and lease.holder == ann.peer_id:
                    lease.progress_at = now
        trust = task.trust
        if authored and ann.peer_id not in trust.authors:
            trust = trust.model_copy(update={
                "authors": tuple(sorted((*trust.authors, ann.peer_id)))})
        if authored and trust.registry is None and ann.registry is not None:
            trust = trust.model_copy(update={"registry": ann.registry})
        if ann.sealed and not rejected and not task.meta.sealed \
                and ann.peer_id not in trust.confirmed and task.held.get(ann.peer_id, 0) >= count:
            trust = trust.model_copy(update={
                "confirmed": tuple(sorted((*trust.confirmed, ann.peer_id)))})
            if len(trust.confirmed) >= CONFIRMATIONS_TO_SEAL:
                task.meta = task.meta.model_copy(update={"sealed": True})
        task.trust = trust
        return AnnounceReply(accepted=accepted, rejected=rejected, deferred=deferred)

    def withdraw(self, wd: Withdraw) -> None:
        """A peer no longer holds some pieces (a chunk failed its digest at rest, an eviction):
        stop handing it out for them. Unknown tasks and pieces are nothing to do."""
        peer = self._peer(wd.peer_id)
        task = self.tasks.get(wd.task_id)
        if task is None:
            return
        indices = list(task.pieces) if wd.pieces is None else wd.pieces
        dropped = 0
        for i in indices:
            piece = task.pieces.get(i)
            if piece is not None and peer.id in piece.holders:
                piece.holders.discard(peer.id)
                dropped += 1
        if dropped:
            left = task.held.get(peer.id, 0) - dropped
            if left > 0:
                task.held[peer.id] = left
            else:
                task.held.pop(peer.id, None)

    def blob_mismatch(self, peer_id: str, task_id: str, now: float,
                      registry: str | None = None) -> None:
        """A peer assembled the blob and its sha256 did not match: the piece map, sealed or
        not, is wrong somewhere, so forget it, flag the peers that authored its chunk ids and
        let the origin be the judge again. A reporter resets a task at most every
        RESET_EVERY seconds; one of another registry than an unsealed map's fetched its bytes
        elsewhere, so its report says nothing about this map."""
        self._peer(peer_id)
        task = self._task(task_id)
        trust = task.trust
        if trust.foreign(registry, task.meta.sealed):
            return
        last = trust.resets.get(peer_id)
        if last is not None and now - last < RESET_EVERY:
            return
        for author in trust.authors:
            peer = self.peers.get(author)
            if peer is not None and author != peer_id:  # a reporter is not its own suspect
                self._penalise(peer, "mismatch", now)
        task.pieces.clear()
        task.leases.clear()
        task.held.clear()
        resets = {r: t for r, t in trust.resets.items() if now - t < RESET_EVERY}
        task.trust = TaskTrust(resets={**resets, peer_id: now})
        if task.meta.sealed:
            task.meta = task.meta.model_copy(update={"sealed": False})

    def report(self, rep: Report, now: float) -> None:
        self._peer(rep.peer_id)
        parent = self.peers.get(rep.parent_id)
        if parent is None:
            return
        self._penalise(parent, rep.kind, now)
        if rep.kind == "corrupt" and rep.piece is not None:
            task = self.tasks.get(rep.task_id)
            piece = task.pieces.get(rep.piece) if task else None
            if piece is not None and rep.parent_id in piece.holders:
                piece.holders.discard(rep.parent_id)
                task.held[rep.parent_id] -= 1

    def _penalise(self, peer: PeerState, kind: str, now: float) -> None:
        peer.penalty_until = max(peer.penalty_until, now + PENALTY_SECONDS[kind])
        peer.penalty_reason = kind

    # -- scheduling ------------------------------------------------------------------------

    def schedule(self, req: ScheduleRequest, now: float,
                 pieces: Iterable[int] | None = None) -> list[Decision]:
        """Decide, for each wanted piece, between parents, an origin lease, or waiting; of
        `pieces` (some of the request's) instead of all of its pieces if given: a long poll
        that decides again only the pieces an announcement touched, without a copy of its
        request (`model_copy`, ~5 us) each time.

        Cluster-wide single flight: a piece nobody usable holds is fetched from the origin by at
        most one peer at a time, the holder of its lease; a lease whose holder made no progress
        for `lease_timeout`, or left, is taken over under a new epoch.
        """
        requester = self._peer(req.peer_id)
        requester.last_seen = now
        task = self._task(req.task_id)
        count = task.piece_count
        exclude = set(req.exclude)
        exclude.add(req.peer_id)
        max_run = max(1, min(MAX_LEASE_PIECES, MAX_LEASE_BYTES // task.meta.piece_size))
        cold = not task.held and not any(self._lease_live(le, now)
                                         for le in task.leases.values())
        wanted = list(dict.fromkeys(req.pieces if pieces is None else pieces))
        if wanted and max(wanted) >= count:  # refuse before any lease is granted
            raise StateError(f"piece {max(wanted)} out of range: task has {count} pieces")
        if task.trust.foreign(req.registry, task.meta.sealed):
            if not cold:
                # The provisional chunk ids and holders came from another registry: this
                # requester reads its own registry directly, without a lease, until sealed.
                return [Decision(piece=i, action="source", reason="other-registry")
                        for i in wanted]
            # Nobody holds or fetches the map any more: forget it, bind to this registry.
            task.pieces.clear()
            task.leases.clear()
            task.trust = TaskTrust(resets=task.trust.resets)
        if task.trust.registry is None and req.registry is not None and not task.meta.sealed \
                and wanted:
            task.trust = task.trust.model_copy(update={"registry": req.registry})
        grant: Lease | None = None
        decisions: list[Decision] = []
        sourced = False  # a source decision is in `decisions`
        spread: int | None = None  # leased pieces the requester may still take (None: unbounded)
        counted = False
        elsewhere = False  # a peer of another IDC than the requester's holds a live lease
        for index in wanted:
            piece = task.pieces.get(index)
            parents = self._parents(task, piece, requester, exclude, now)
            if isinstance(parents, str):
                decisions.append(_wait(index, parents))
                continue
            if parents:
                decisions.append(Decision(piece=index, action="parents", chunk=piece.chunk,
                                          parents=parents))
                continue
            lease = task.leases.get(index)
            if lease is not None and self._lease_live(lease, now):
                if lease.holder == req.peer_id:
                    decisions.append(self._source(index, lease, "lease"))
                    sourced = True
                else:
                    decisions.append(_wait(index, None))
                continue
            if not counted:
                counted = True
                elsewhere = self._leased_elsewhere(task, requester, now)
                spread = 0 if elsewhere else self._lease_room(task, requester, max_run, now)
            if spread is not None:
                if spread <= 0:
                    decisions.append(_wait(index, "lease-idc" if elsewhere else "lease-spread"))
                    continue
                spread -= 1
            if grant is not None and grant.last == index - 1 \
                    and grant.last - grant.first + 1 < max_run:
                grant.last = index
            else:
                grant = Lease(holder=req.peer_id, epoch=task.next_epoch, first=index,
                              last=index, progress_at=now)
                task.next_epoch += 1
                self.back_to_source += 1
            if lease is not None:
                reason = "lease-expired"
            elif cold:
                reason = "new-task"
            elif piece is not None and piece.holders:
                reason = "parents-unusable"
            else:
                reason = "no-holder"
            task.leases[index] = grant
            decisions.append(self._source(index, grant, reason))
            sourced = True
        # A run's decisions carry its final bounds, known only once the run stopped growing.
        if not sourced:
            return decisions
        return [self._with_bounds(d, task) for d in decisions]

    @staticmethod
    def _source(index: int, lease: Lease, reason: str) -> Decision:
        return Decision(piece=index, action="source", epoch=lease.epoch, reason=reason)

    @staticmethod
    def _with_bounds(d: Decision, task: TaskState) -> Decision:
        if d.action != "source":
            return d
        lease = task.leases[d.piece]
        return d.model_copy(update={"first": lease.first, "last": lease.last})

    def _lease_room(self, task: TaskState, requester: PeerState, max_run: int, now: float
                    ) -> int | None:
        """How many more pieces `requester` may lease now: a run's 1/LEASE_SPREAD less those
        its live leases hold, while another peer takes part in the task (holds a piece or a
        live lease); None (unbounded) for a lone reader, whose every piece nobody else would
        lease, with LEASE_SPREAD 0, and for a requester with an IDC label: spread leases went
        to hosts of every IDC in turn, and each piece leased outside the origin's IDC crossed
        back into it (bench.sim idc3, 60 hosts: 2.00x -> 2.47x the blob across IDCs); the
        scheduler does not know which IDC the origin is in. (A labelled requester leases
        nothing at all while another IDC leases: `_leased_elsewhere`.)"""
        if not LEASE_SPREAD or requester.reg.idc:
            return None
        mine, leasing, best = 0, False, 0.0
        for lease in _unique(task.leases.values()):
            if self._lease_live(lease, now):
                if lease.holder == requester.id:
                    mine += sum(1 for i in range(lease.first, lease.last + 1)
                                if task.leases.get(i) is lease)
                else:
                    leasing = True
                    best = max(best, self.peers[lease.holder].load.upload_rate)
        if not leasing and len(task.held) <= 1:
            return None
        if leasing and (_suspect(requester, now) or not _uploads_well(requester.load, best)):
            # It would be its pieces' only holder for a while: while others lease, one whose
            # uploads are slow or not known to go well, or that served corrupt bytes (its pieces
            # were fetched from the origin again) leaves them to the others (a slow uplink
            # that leased held the crowd back behind it, so it got ahead and leased on:
            # bench.sim lab16 --slow 0.25, p99 6.6x the bound).
            return 0
        return max(1, max_run // LEASE_SPREAD) - mine

    def _leased_elsewhere(self, task: TaskState, requester: PeerState, now: float) -> bool:
        """Whether a peer of another IDC label than `requester`'s holds a live lease of `task`
        (LEASE_IDC): then `requester` leases nothing, and waits for that IDC's copy. Never for
        a requester without a label, nor beside a holder without one (nothing is known of
        where either is)."""
        idc = requester.reg.idc
        if not LEASE_IDC or not idc:
            return False
        idc_of = self.idc_of
        return any(lease.holder != requester.id and (other := idc_of(lease.holder))
                   and other != idc and self._lease_live(lease, now)
                   for lease in _unique(task.leases.values()))

    def _lease_live(self, lease: Lease, now: float) -> bool:
        holder = self.peers.get(lease.holder)
        if holder is None:
            return False
        quiet = now - lease.progress_at
        if quiet >= self.lease_timeout:
            return False
        # A holder its children just found down or silent (a penalty: `failed`, `slow`, ...)
        # keeps its lease only by the progress a live one reports every PROGRESS_EVERY: waiting
        # the whole lease_timeout on a dead host's lease idled a fast crowd (bench.sim die1
        # with the spread share: all 39 survivors parked ~1 s on one piece).
        return quiet < SUSPECT_LEASE_QUIET or not holder.penalised(now)

    def _parents(self, task: TaskState, piece: PieceState | None, requester: PeerState,
                 exclude: set[str], now: float) -> list[ParentRef] | str:
        """The holders to fetch from, best first; [] if none is usable; else the reason to
        wait: every usable holder has its share of children in flight for this piece
        (`holders-busy`), or none is in the requester's IDC and a copy into it is in flight
        (`idc-copy-in-flight`)."""
        if piece is None or not piece.holders:
            return []
        holders = piece.holders
        sampled = len(holders) > HOLDER_SAMPLE
        pool = self._sample(piece, holders) if sampled else holders
        if self._surely_busy(piece, pool, requester, exclude, now):
            return "holders-busy"
        # Usable holders as their records: whether to wait needs only their number and IDC.
        # Candidates (load, decayed handouts) are built once the requester is admitted: most
        # decisions of a crowd are `holders-busy` (346k of 390k in bench.sim kraken, 50 hosts).
        found = self._usable(pool, exclude, now)
        usable = len(found)
        if sampled and usable < PARENTS_PER_PIECE:
            found = self._usable(holders, exclude, now)  # the sample was unlucky
            usable = len(found)
            sampled = False
        elif sampled:  # as many usable among all as in the sample, for the children's share
            usable = max(usable, usable * len(holders) // HOLDER_SAMPLE)
        idc = requester.reg.idc
        near = [p for p in found if p.reg.idc == idc] if idc else []
        if idc and found and not near:
            if sampled:  # the sample missed the IDC: its holders, if any, from all of them
                near = self._usable(self._in_idc(holders, idc), exclude, now)
                found += near
                sampled = False  # those are all of them
            if not near and self._copy_in_flight(piece, idc, requester.id, now):
                return "idc-copy-in-flight"
        if near:  # offered only its IDC's holders (policy): the children's share is theirs
            usable = max(len(near), len(near) * len(holders) // HOLDER_SAMPLE) if sampled \
                else len(near)
        if found and not self._admit_child(piece, requester.id, usable, now):
            return "holders-busy"
        # The policy keeps only the IDC's holders when there are any: weigh just those.
        ranked = policy.rank_parents(self._candidates(task, near or found, now),
                                     requester.reg.idc, requester.reg.location,
                                     PARENTS_PER_PIECE, self.rng)
        if ranked:
            first = self.peers[ranked[0].peer_id]
            first.handouts = ranked[0].handouts + 1.0
            first.handouts_at = now
        transport = requester.reg.transport
        return [self._ref(self.peers[c.peer_id], transport) for c in ranked]

    @staticmethod
    def _ref(holder: PeerState, transport: int) -> ParentRef:
        """`holder` as a parent for a requester speaking up to `transport`."""
        reg = holder.reg
        transport = min(reg.transport, transport)
        cached = holder.refs
        if cached is None or cached[0] is not reg:
            cached = holder.refs = (reg, {})
        ref = cached[1].get(transport)
        if ref is None:
            ref = cached[1][transport] = ParentRef(id=reg.id, addr=reg.upload_addr,
                                                   transport=transport)
        return ref

    def _surely_busy(self, piece: PieceState, pool: Iterable[str], requester: PeerState,
                     exclude: set[str], now: float) -> bool:
        """Whether `requester` must wait for `piece` (`holders-busy`) however many of its
        holders are usable, as long as one of `pool` is (of its IDC, if it has one): the
        children in flight fill the share of all of them, and `requester` is not one. A
        crowd's commonest answer, found without listing the usable holders and their IDCs; the
        full rule gives the same answer, prunes nothing (no child is stale) and reads no more
        than it does (the pool's records first, then the children)."""
        idc = requester.reg.idc
        for peer in self._usable_iter(pool, exclude, now):
            if not idc or peer.reg.idc == idc:
                break
        else:
            return False  # none usable (not a wait), or none of its IDC: the full rule's to say
        children = piece.children
        if not children or len(children) < CHILDREN_PER_HOLDER * len(piece.holders):
            return False
        since = children.get(requester.id)
        if since is not None and now - since < self.lease_timeout \
                and requester.id not in piece.holders:
            return False  # a child already: admitted again
        return self._all_in_flight(piece, children, now)

    def _sample(self, piece: PieceState, holders: set[str]) -> list[str]:
        """The HOLDER_SAMPLE of a piece's holders (more than that) a decision weighs: the
        only draw of the holder sample, one `rng.sample` of them in their set's order. A store
        that plans its reads can draw it ahead through the same rng (or override this)."""
        order = holders.ordered() if type(holders) is Holders else list(holders)
        if type(self.rng) is random.Random:
            return _draw_sample(self.rng, order)
        return self.rng.sample(order, HOLDER_SAMPLE)  # a store's own (HolderSample)

    def _usable(self, holders: Iterable[str], exclude: set[str], now: float
                ) -> list[PeerState]:
        """The usable ones among `holders` (known, not excluded, cordoned or penalised), in
        their order (the policy breaks ties with the rng, in this order)."""
        return list(self._usable_iter(holders, exclude, now))

    def _usable_iter(self, holders: Iterable[str], exclude: set[str], now: float
                     ) -> Iterator[PeerState]:
        peers = self.peers
        return (peer for holder_id in holders
                if (peer := peers.get(holder_id)) is not None and holder_id not in exclude
                and not peer.cordoned and now >= peer.penalty_until)  # PeerState.penalised

    def _candidates(self, task: TaskState, holders: list[PeerState], now: float
                    ) -> list[policy.Candidate]:
        """What the policy weighs of each usable holder: valid until the next decision, which
        reuses the same objects (PeerState.candidate)."""
        count = task.piece_count
        held = task.held
        exp, half = math.exp, policy.HANDOUT_DECAY_SECONDS
        out = []
        for holder in holders:  # an admitted decision weighs up to HOLDER_SAMPLE of them
            reg, load, cached = holder.candidate or (None, None, None)
            if reg is not holder.reg or load is not holder.load:
                reg, load = holder.reg, holder.load
                cached = policy.Candidate(reg.id, reg.idc, reg.location, reg.upload_slots,
                                          load.active_uploads, 0.0, False, reg.seed,
                                          load.upload_rate)
                holder.candidate = (reg, load, cached)
            handouts = holder.handouts
            if handouts:  # policy.decayed's expression inlined (~0.4 us a call, 24 a decision)
                elapsed = now - holder.handouts_at
                handouts = handouts * exp(-(elapsed if elapsed > 0.0 else 0.0) / half)
            cached.handouts = handouts
            cached.complete = held.get(cached.peer_id, 0) >= count  # reg.id, not its dict
            out.append(cached)
        return out

    def _in_idc(self, peer_ids: Iterable[str], idc: str) -> list[str]:
        return [p for p in peer_ids if (peer := self.peers.get(p)) is not None
                and peer.reg.idc == idc]

    def _copy_in_flight(self, piece: PieceState, idc: str, requester: str, now: float) -> bool:
        """Whether another peer of `idc` is a child of `piece` in flight (handed out within a
        lease timeout, not yet a holder): the piece crosses into an IDC once, then spreads
        inside it, instead of each of its requesters fetching it across the thin link. Bounded
        like the children's share, so a dead child holds nobody back for long."""
        return any(c != requester and now - t < self.lease_timeout and c not in piece.holders
                   and (peer := self.peers.get(c)) is not None and peer.reg.idc == idc
                   for c, t in (piece.children or {}).items())

    def _admit_child(self, piece: PieceState, requester: str, holders: int,
                     now: float) -> bool:
        """Whether `requester` may fetch `piece` now: it is already one of its children, or
        the children in flight (handed out within a lease timeout, not yet holders) are fewer
        than CHILDREN_PER_HOLDER per usable holder. Children no longer in flight are dropped
        only when the count reaches the share (they can only make it larger): a crowd's
        every decision does not walk the piece's thousands of children."""
        children = piece.children
        if children is None:
            children = Children()
        share = CHILDREN_PER_HOLDER * holders
        since = children.get(requester)
        holder = requester in piece.holders
        if since is None or now - since >= self.lease_timeout or holder:
            if len(children) >= share:
                children = self._in_flight(piece, children, now)
            if len(children) >= share:
                piece.children = children or None
                return False
        if type(children) is not Children:
            children[requester] = now
        elif not holder:  # a holder would only be pruned: it is no child in flight
            children.hand(requester, now)
        piece.children = children
        return True

    def room(self, task_id: str, pieces: Iterable[int], now: float) -> dict[int, int | Room]:
        """How many more children each of `pieces` may be handed now: CHILDREN_PER_HOLDER per
        holder less the children in flight (0 for a piece nobody holds). However many of its
        holders are usable, no more calls waiting for it than that can be admitted by a
        decision now: what an announcement of these pieces wakes (`Waiters.notify`), instead
        of a constant that woke calls only to wait again (10,500 of 44,000 woken calls in
        bench.sim kraken, 50 hosts, got nothing). A piece with holders in IDCs has a `Room`
        instead, the same counted by the requester's IDC. Drops the stale children it meets."""
        task = self.tasks.get(task_id)
        out: dict[int, int | Room] = {}
        for i in pieces:
            piece = task.pieces.get(i) if task is not None else None
            if piece is None or not piece.holders:
                out[i] = 0
                continue
            children = piece.children
            live = self._in_flight(piece, children, now) if children else {}
            holders = piece.holders
            counts = holders.idcs(self.idc_of) if type(holders) is Holders \
                else Holders(holders).idcs(self.idc_of)
            share = CHILDREN_PER_HOLDER * len(holders)
            if len(counts) == 1 and "" in counts:  # nobody in an IDC: one room for all
                out[i] = max(0, share - len(live))
            else:
                out[i] = Room(self, counts, share, live)
        return out

    def idc_of(self, peer_id: str) -> str:
        """A peer's IDC ("": none, or not known)."""
        peer = self.peers.get(peer_id)
        return peer.reg.idc if peer is not None else ""

    def _in_flight(self, piece: PieceState, children: dict[str, float],
                   now: float) -> dict[str, float]:
        """`piece`'s children still in flight (neither stale nor holders): an ordered
        `Children` drops its stale prefix in place (none is a holder); a plain dict (what the
        Redis store loads) is itself if all are in flight, else filtered into a new one."""
        if type(children) is Children and children.ordered:
            children.drop_stale(now, self.lease_timeout)
            return children
        if self._all_in_flight(piece, children, now):
            return children
        return {c: t for c, t in children.items()
                if now - t < self.lease_timeout and c not in piece.holders}

    def _all_in_flight(self, piece: PieceState, children: dict[str, float], now: float) -> bool:
        """Whether no child of `piece` is done (a holder) or stale, so pruning would keep them
        all: a crowd's every `holders-busy` rebuilt the map in Python, while these two tests
        run in C. The oldest is in flight only if all are (a float difference is monotonic):
        a `Children`'s first."""
        if not children:
            return True
        if type(children) is Children and children.ordered:
            return now - next(iter(children.values())) < self.lease_timeout
        return (now - min(children.values()) < self.lease_timeout
                and piece.holders.isdisjoint(children))

    # -- views -----------------------------------------------------------------------------

    def cluster_counters(self) -> dict[str, int]:
        return self.totals.sums()

    def savings_ratio(self) -> float:
        c = self.cluster_counters()
        return 1.0 - c["origin"] / c["served"] if c["served"] else 0.0

    def peer_view(self, peer: PeerState, now: float) -> dict:
        return {
            "id": peer.id, "upload_addr": peer.reg.upload_addr, "idc": peer.reg.idc,
            "location": peer.reg.location, "seed": peer.reg.seed,
            "upload_slots": peer.reg.upload_slots, "load": peer.load.model_dump(),
            "counters": peer.counters.model_dump(), "cordoned": peer.cordoned,
            "penalised": peer.penalised(now), "penalty_reason": peer.penalty_reason or None,
            "last_heartbeat_age": round(now - peer.last_seen, 3),
            "registered_at": peer.registered_at, "tasks": len(peer.tasks),
        }

    def task_view(self, task: TaskState, detail: bool) -> dict:
        out = {**task.meta.model_dump(), "pieces": task.layout.count,
               "pieces_known": len(task.pieces), "holders": len(task.held),
               "complete_holders": len(task.complete_holders())}
        if detail:
            out["piece_map"] = [
                {"index": i, "chunk": p.chunk, "holders": sorted(p.holders),
                 "lease": self._lease_view(task.leases.get(i))}
                for i, p in sorted(task.pieces.items())]
            # By epoch, as the Redis store lists them: the memory store's map keeps a piece's
            # first place when it is leased again, so its order was its history's.
            out["leases"] = [self._lease_view(le) for le in sorted(
                _unique(task.leases.values()), key=lambda le: le.epoch)]
        return out

    @staticmethod
    def _lease_view(lease: Lease | None) -> dict | None:
        if lease is None:
            return None
        return {"holder": lease.holder, "epoch": lease.epoch, "first": lease.first,
                "last": lease.last}


# Wait decisions are most of the answers (a crowd's `holders-busy`: two thirds of bench.sim's
# decisions) and frozen, so they are shared, one per piece and reason, rather than validated
# each time; bounded, since piece indices are the peers' to choose.
_WAITS: dict[tuple[int, str | None], Decision] = {}
_WAITS_MAX = 1 << 16


def _wait(index: int, reason: str | None) -> Decision:
    d = _WAITS.get((index, reason))
    if d is None:
        if len(_WAITS) >= _WAITS_MAX:
            _WAITS.clear()
        d = _WAITS[index, reason] = Decision(piece=index, action="wait") if reason is None \
            else Decision(piece=index, action="wait", reason=reason)  # the same fields set
    return d


# random.sample's threshold between its two ways of drawing, for HOLDER_SAMPLE.
_SAMPLE_POOL_MAX = 21 + 4 ** math.ceil(math.log(HOLDER_SAMPLE * 3, 4))


def _draw_sample(rng: random.Random, population: list[str]) -> list[str]:
    """`rng.sample(population, HOLDER_SAMPLE)` of more: the same draws and the same result
    (CPython 3.11's algorithm with `_randbelow` inlined; tests/test_state.py checks it against
    `random.sample`). A sampled decision drew 24 numbers through two Python calls each: a
    third of a crowd's decision at 64 holders."""
    n = len(population)
    getrandbits = rng.getrandbits
    out = []
    if n <= _SAMPLE_POOL_MAX:  # draw from a shrinking copy
        pool = list(population)
        for i in range(HOLDER_SAMPLE):
            m = n - i
            bits = m.bit_length()
            j = getrandbits(bits)
            while j >= m:
                j = getrandbits(bits)
            out.append(pool[j])
            pool[j] = pool[m - 1]
        return out
    picked: set[int] = set()
    bits = n.bit_length()
    for _ in range(HOLDER_SAMPLE):
        j = getrandbits(bits)
        while j >= n or j in picked:  # out of range, or drawn already: draw again
            j = getrandbits(bits)
        picked.add(j)
        out.append(population[j])
    return out


def _suspect(peer: PeerState, now: float) -> bool:
    """Penalised for bytes it served: its own pieces would be unusable as parents."""
    return peer.penalised(now) and peer.penalty_reason in ("corrupt", "mismatch")


def _uploads_well(load: PeerLoad, best: float) -> bool:
    """Whether a peer's uploads go well beside the `best` measured rate of the other lease
    holders: not slow (policy.slow); not measured yet, only while none of them is measured
    either and it has no upload under way (a pull's start). Letting a peer not measured lease
    beside measured ones, a slow one did: bench.sim lab16 --slow 0.25 seed 2, p50 4.76x and
    origin 2.11x the blob."""
    if load.upload_rate:
        return not policy.slow(load.upload_rate, best)
    return not best and not load.active_uploads


def _unique(leases: Iterable[Lease]) -> list[Lease]:
    seen: dict[int, Lease] = {}
    for lease in leases:
        seen.setdefault(id(lease), lease)
    return list(seen.values())
