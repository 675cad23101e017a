"""Loading one call's slice of state: the peers, tasks and pieces its rule touches, into a
`ClusterState` of `Partial` maps (`World`), with what was loaded kept to diff against."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from common.models import PeerRegistration, TaskMeta
from scheduler.redis import records
from scheduler.redis.keys import Keys, last_field
from scheduler.redis.partial import Partial
from scheduler.state import (
    HOLDER_SAMPLE,
    ClusterState,
    PeerState,
    PieceState,
    TaskState,
    TaskTrust,
    on_mutation,
)

if TYPE_CHECKING:
    from scheduler.redis.store import RedisStore

T = TypeVar("T")


@dataclass
class PieceBase:
    """A piece as loaded."""

    chunk: str | None
    holders: HolderSet  # and the children an earlier layout's replica wrote after them
    children: dict[str, float] | None  # its children hash; None: not loaded
    versioned: bool = False  # Redis vouched for its field's version (keys.holders_seq)


class HolderSet:
    """One decoded holders field, shared by every piece whose field read the same (`users`):
    the holders, their list (the sample is drawn from it) and the children an earlier layout
    wrote after them."""

    __slots__ = ("_order", "base", "legacy", "raw", "users")

    def __init__(self, raw: str, base: frozenset[str] | None = None, legacy: str = "") -> None:
        self.raw = raw
        if base is None:
            holders, _, legacy = raw.partition("|")
            base = frozenset(holders.split(",")) if holders else frozenset()
        self.base, self.legacy = base, legacy
        self._order: list[str] | None = None
        self.users = 0

    @property
    def order(self) -> list[str]:
        """The holders as a list (drawn from when they are more than HOLDER_SAMPLE)."""
        if self._order is None:
            self._order = list(self.base)
        return self._order


Seq = tuple[str, str]  # a holders field's version: (its task's created_at, its `hseq`)
# Bytes of a holders field from which its version is checked rather than the field read again:
# redis-server's CPU for 8 fields read plainly / checked, 251 B each 14 / 14 us, 767 B 31 / 13,
# 3 KB 109 / 16, 37 KB 1,188 / 13 (READ_LUA run in a loop, vm, 2026-12-02).
VERSIONED = 512


class HolderCache:
    """Decoded holders fields, per task piece, while the raw field read back is the same: at
    2,600 holders, splitting the ~37 KB field and hashing its ids, then hashing them again
    to find the piece's sample, was half of a decision's CPU. Pieces whose fields are equal
    share one `HolderSet` (and so one sample per batch). Only fields of more than
    HOLDER_SAMPLE holders are kept, bounded by the ids they hold: the pieces least recently
    changed or added go first.

    With an entry's version (`seq`, when Redis vouched for one: scripts.READ_LUA's `HOLDERS`)
    a read of a field of `versioned` bytes or more sends the version instead of fetching the
    field, and gets the field back only if it changed since: redis-server encoded the ~37 KB
    field of 2,600 holders for every decision. A shorter field costs as much to read again as
    to check (two more reads in Redis)."""

    def __init__(self, limit: int = 500_000, least: int = HOLDER_SAMPLE,
                 versioned: int = VERSIONED) -> None:
        self.limit = limit
        self.least = least  # fields of this many holders or fewer are decoded, not kept
        self.versioned = versioned
        self.pieces: dict[tuple[str, int], HolderSet] = {}
        self.sets: dict[str, HolderSet] = {}  # by raw field: equal fields, one set
        self.seqs: dict[tuple[str, int], Seq] = {}  # of entries in `pieces`, when known
        self.size = 0  # ids in `sets`

    def cached(self, tid: str, index: int) -> tuple[HolderSet, Seq | None] | None:
        """The piece's decoded field and its version, if worth checking (`versioned`)."""
        hs = self.pieces.get((tid, index))
        if hs is None or len(hs.raw) < self.versioned:
            return None
        return hs, self.seqs.get((tid, index))

    def get(self, tid: str, index: int, raw: str, seq: Seq | None = None) -> HolderSet:
        """The decoded field `raw`; `seq`: its version, which Redis read with it."""
        key = (tid, index)
        hs = self.pieces.get(key)
        if hs is not None and hs.raw == raw:
            if seq is not None:
                self.seqs[key] = seq
            return hs
        if raw.count(",") < self.least:  # cheap to decode: not kept (a cluster of many small
            return HolderSet(raw)  # tasks would keep every piece it ever read)
        return self._put(key, raw, lambda: HolderSet(raw), seq)

    def vouched(self, tid: str, index: int, loaded: HolderSet, seq: Seq) -> None:
        """A write gave the field `loaded` was decoded from the version `seq`."""
        if self.pieces.get((tid, index)) is loaded:
            self.seqs[(tid, index)] = seq

    def joined(self, tid: str, index: int, loaded: HolderSet, added: frozenset[str],
               seq: Seq | None = None) -> None:
        """What this replica's claims appended to a field it had loaded (`happend`), so that
        the next read finds it decoded (a claim changes the field each time: each decoded it
        afresh), with `seq` the version the write gave it. Only a hint: the raw field read
        back, or its version, decides, as for every entry."""
        if len(loaded.base) + len(added) <= self.least:
            return
        raw = records.append_holders(loaded.raw, records.encode_holders(added))
        self._put((tid, index), raw,
                  lambda: HolderSet(raw, loaded.base | added, loaded.legacy), seq)

    def _put(self, key: tuple[str, int], raw: str, new: Callable[[], HolderSet],
             seq: Seq | None) -> HolderSet:
        hs = self.sets.get(raw)
        if hs is None:
            hs = self.sets[raw] = new()
            self.size += len(hs.base)
        hs.users += 1
        old = self.pieces.pop(key, None)
        self.pieces[key] = hs  # (last in order: kept longest)
        if seq is None:
            self.seqs.pop(key, None)
        else:
            self.seqs[key] = seq
        if old is not None:
            self._release(old)
        while self.size > self.limit and len(self.pieces) > 1:
            gone = next(iter(self.pieces))
            self.seqs.pop(gone, None)
            self._release(self.pieces.pop(gone))
        return hs

    def _release(self, hs: HolderSet) -> None:
        hs.users -= 1
        if not hs.users:
            del self.sets[hs.raw]
            self.size -= len(hs.base)


class LoadedHolders(set[str]):
    """A piece's holders as loaded, for the rules: a set, which knows whether a rule changed it
    since (`changed`), so that its unchanged holders are neither compared nor written back and
    its sample is the one the plan drew for the loaded `HolderSet`."""

    __slots__ = ("changed", "loaded")

    def __init__(self, loaded: HolderSet) -> None:
        super().__init__(loaded.base)
        self.loaded = loaded
        self.changed = False

    def unchanged(self) -> HolderSet | None:
        return None if self.changed else self.loaded


def _mark_changed(holders: LoadedHolders) -> None:
    holders.changed = True


on_mutation(LoadedHolders, _mark_changed)


def unloaded() -> Partial:
    """A piece's children, not loaded: a rule that reads them fails loudly (`NotLoaded`)."""
    return Partial({}, (), unloaded=None)


@dataclass
class TaskBase:
    """A task as loaded, to diff the rule's result against."""

    version: str | None  # None: the task did not exist
    meta: TaskMeta | None = None
    stamp: str = ""  # created_at as stored: which task a holders field's version is of
    seq_version: str | None = None  # `nv`: the version this layout's last write left
    next_epoch: int = 1
    leases: str = ""
    trust: TaskTrust = field(default_factory=TaskTrust)
    pieces: dict[int, PieceBase | None] = field(default_factory=dict)
    held: dict[str, int | None] = field(default_factory=dict)


@dataclass
class World:
    state: ClusterState
    now: float = 0.0
    peers: dict[str, tuple | None] = field(default_factory=dict)  # loaded values; None: absent
    peer_tasks: dict[str, frozenset[str]] = field(default_factory=dict)
    ghosts: set[str] = field(default_factory=set)  # expired peers whose holdings are swept
    tasks: dict[str, TaskBase] = field(default_factory=dict)
    cordoned: dict[str, bool] = field(default_factory=dict)
    last_counters: dict[str, str | None] = field(default_factory=dict)


async def gather(calls: list[Awaitable[T]]) -> list[T]:
    """All of them, each to its end; then the first failure, if any, is raised as itself (the
    API answers a RedisError with 503)."""
    if len(calls) == 1:
        return [await calls[0]]
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


class Reads:
    """Commands for the read script, each with the key whose slot it reads and how to shape its
    JSON reply like redis-py's. `run` sends each group's commands (a node's, on a cluster) as
    one read: one snapshot."""

    def __init__(self) -> None:
        self.cmds: list[tuple[str | None, str, Callable[[Any], Any]]] = []  # JSON each

    def _add(self, key: str | None, shape: Callable[[Any], Any], *cmd: Any) -> None:
        self.cmds.append((key, _encode([str(x) for x in cmd]), shape))

    def encoded(self, key: str, shape: Callable[[Any], Any], cmd: str) -> None:
        """A command already encoded (`_encode`): one a replica sends again and again."""
        self.cmds.append((key, cmd, shape))

    def hmget(self, key: str, *fields: Any) -> None:
        self._add(key, _values, "HMGET", key, *fields)

    def hgetall(self, key: str) -> None:
        self._add(key, _pairs, "HGETALL", key)

    def hget(self, key: str, fld: str) -> None:
        self._add(key, _value, "HGET", key, fld)

    def hlen(self, key: str) -> None:
        self._add(key, int, "HLEN", key)

    def scard(self, key: str) -> None:
        self._add(key, int, "SCARD", key)

    def exists(self, key: str) -> None:
        self._add(key, int, "EXISTS", key)

    def smembers(self, key: str) -> None:
        self._add(key, _values, "SMEMBERS", key)

    def zrange(self, key: str) -> None:
        self._add(key, _values, "ZRANGE", key, 0, -1)

    def holders(self, tid: str, keys: Keys, fields: list[int],
                cached: list[tuple[HolderSet, Seq | None] | None]) -> None:
        """Pieces' holders fields, those `cached` with a version sent as it (READ_LUA's
        `HOLDERS`): each comes back as its raw field, or as the cached set if Redis vouched
        that its field is unchanged, with the version Redis vouches for (None: none)."""
        stamp = next((c[1][0] for c in cached if c is not None and c[1] is not None), "")
        cmd = ["HOLDERS", keys.task(tid), keys.holders(tid), keys.holders_seq(tid), stamp]
        for i, c in zip(fields, cached, strict=True):
            seq = None if c is None else c[1]
            cmd += [str(i), seq[1] if seq is not None and seq[0] == stamp else ""]

        def shape(r: Any) -> list[tuple[Any, str | None]]:
            out = []
            for n, c in enumerate(cached):
                raw, seq = r[2 * n], r[2 * n + 1]
                if type(raw) is int:  # unchanged: the set it was sent for
                    assert c is not None
                    raw = c[0]
                out.append((None if raw is False else raw, seq or None))
            return out
        self.cmds.append((keys.holders(tid), _encode(cmd), shape))

    def time(self) -> None:
        """The clock of the slot read first (a task's, when the call names one)."""
        self._add(None, lambda r: (int(r[0]), int(r[1])), "TIME")

    async def run(self, read: Callable[[str, str], Awaitable[str]],
                  group_of: Callable[[str], Hashable], clock_key: str | None = None) -> list:
        clock_key = clock_key or next((k for k, _, _ in self.cmds if k is not None), "-")
        groups: dict[Hashable, tuple[str, list[int]]] = {}
        for i, (key, _, _) in enumerate(self.cmds):
            route = clock_key if key is None else key
            groups.setdefault(group_of(route), (route, []))[1].append(i)
        raws = await gather([read(route, "[" + ",".join([self.cmds[i][1] for i in idx]) + "]")
                             for route, idx in groups.values()])
        out: list = [None] * len(self.cmds)
        for (_, idx), raw in zip(groups.values(), raws, strict=True):
            replies = json.loads(raw)
            for i, r in zip(idx, [] if replies == {} else replies, strict=True):
                out[i] = self.cmds[i][2](r)  # cjson: {} for an empty list
        return out


_encode = json.JSONEncoder(separators=(",", ":")).encode


def _value(r: Any) -> Any:
    return None if r is False else r


def _values(r: Any) -> list:
    return [] if r == {} else [None if x is False else x for x in r]  # cjson: {} for empty


def _pairs(r: Any) -> dict:
    return {} if r == {} else dict(zip(r[::2], r[1::2], strict=True))


class HolderSample(random.Random):
    """The random numbers a loaded state's rules draw (the store's own, drawn through), except
    the holders weighed for a decision: `choose` draws a piece's sample while the plan runs,
    so that only the sample's records are read, and the rule's `sample` of the same holders
    is that one. A rule that reaches past it (an unlucky sample, one that missed the
    requester's IDC) touches records not loaded, and the call is planned again with all of
    them (`NotLoaded`)."""

    def __init__(self, rng: random.Random, loaded: Callable[[], set[str] | None]) -> None:
        self._rng = rng
        self._loaded = loaded  # the peers whose records were read (None: all)
        self._chosen: dict[frozenset[str], list[str]] = {}
        super().__init__()

    def random(self) -> float:
        return self._rng.random()

    def getrandbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choose(self, holders: set[str]) -> list[str]:
        """The holders of a piece the rule will weigh: all, or a sample drawn now."""
        if len(holders) <= HOLDER_SAMPLE:
            return list(holders)
        loaded = holders.unchanged() if type(holders) is LoadedHolders else None
        key = frozenset(holders) if loaded is None else loaded.base  # (its hash is kept)
        chosen = self._chosen.get(key)
        if chosen is None:
            order = list(holders) if loaded is None else loaded.order
            chosen = self._chosen[key] = super().sample(order, HOLDER_SAMPLE)
        return chosen

    def drawn(self, holders: set[str]) -> list[str] | None:
        """The sample `choose` drew for these holders, if they are still as loaded."""
        loaded = holders.unchanged() if type(holders) is LoadedHolders else None
        chosen = None if loaded is None else self._chosen.get(loaded.base)
        return None if chosen is None else list(chosen)

    def sample(self, population: Any, k: int, **kw: Any) -> list:
        if k != HOLDER_SAMPLE:
            return super().sample(population, k, **kw)
        chosen = self._chosen.get(frozenset(population))
        if chosen is not None:
            return list(chosen)
        # The holders grew since the plan drew (an earlier call of the same batch announced):
        # a sample of those whose records were read, the drawn sample and the callers.
        loaded = self._loaded()
        pool = population if loaded is None else [h for h in population if h in loaded]
        return super().sample(pool if len(pool) >= k else population, k, **kw)


class LoadedState(ClusterState):
    """The rules on a loaded slice: a piece's sample is the one its plan drew."""

    rng: HolderSample

    def _sample(self, piece: PieceState, holders: set[str]) -> list[str]:
        drawn = self.rng.drawn(holders)
        return drawn if drawn is not None else super()._sample(piece, holders)


class Loader:
    """Builds a `World` in rounds: queue what to read, `run()` it (one read per slot, batched
    with other calls': each slot's part of a round is one atomic snapshot), queue what that
    revealed. A later round may read newer state than an earlier one; the fences at write
    time catch that."""

    def __init__(self, store: RedisStore) -> None:
        self.s = store
        self.k = store.keys
        self.sample = HolderSample(store.rng, lambda: st.peers.loaded)
        st = LoadedState(heartbeat_interval=store.heartbeat_interval,
                         lease_timeout=store.lease_timeout, rng=self.sample)
        st.peers = Partial({}, ())
        st.tasks = Partial({}, ())
        st.totals.last = Partial({}, ())
        self.world = World(st)
        self._queued: list[tuple[Callable[[Reads], None], Callable[[list], None]]] = []
        self._specs: dict[str, _TaskSpec] = {}
        self._barrier: _Barrier | None = None
        self._clock_key: str | None = None
        self._asked: set[str] = set()
        self._ghosts: set[str] = set()
        self._rounds = 0

    def _queue(self, add: Callable[[Reads], None], parse: Callable[[list], None]) -> None:
        """`add` the commands of a read, `parse` their replies once run."""
        self._queued.append((add, parse))

    def peer(self, pid: str, tasks: bool = False) -> None:
        """A peer's record (absent when expired), its cordon flag, and with `tasks` the set
        of tasks it announced."""
        if pid in self._asked:
            return
        self._asked.add(pid)
        k = self.k

        def add(p: Reads) -> None:
            record, cordon = self.s.peer_reads(pid)
            p.encoded(record[0], _values, record[1])
            p.encoded(cordon[0], int, cordon[1])
            if tasks:
                p.smembers(k.peer_tasks(pid))

        def parse(replies: list) -> None:
            if tasks:
                self.world.peer_tasks[pid] = frozenset(replies[2])
            self._add_peer(pid, replies[0], bool(replies[1]))
        self._queue(add, parse)

    def peers(self, ids: Iterable[str]) -> None:
        for pid in ids:
            self.peer(pid)

    def ghost(self, pid: str) -> None:
        """A peer to sweep, with the tasks it announced, if its record is indeed gone."""
        self._ghosts.add(pid)
        self.peer(pid, tasks=True)

    def still_gone(self, pid: str) -> None:
        """Whether a ghost's record is still absent, read after its tasks were: if it is, the
        holdings those reads found are all of a session that has ended (one that came back
        since must have announced after, which moves the tasks' versions)."""
        def parse(replies: list) -> None:
            if replies[0]:
                self.world.ghosts.discard(pid)
        self._queue(lambda p: p.exists(self.k.peer(pid)), parse)

    def task_counts(self, ids: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}

        def parse(replies: list) -> None:
            counts.update(zip(ids, replies, strict=True))
        self._queue(lambda p: [p.scard(self.k.peer_tasks(pid)) for pid in ids], parse)
        return counts

    def last_counters(self, pid: str) -> None:
        def parse(replies: list) -> None:
            raw = replies[0]
            self.world.last_counters[pid] = raw
            self.world.state.totals.last.extend(
                {} if raw is None else {pid: records.counters(raw)}, [pid])
        self._queue(lambda p: p.hget(self.k.counters(pid), last_field(pid)), parse)

    def task(self, tid: str, pieces: Iterable[int] | None, held: Iterable[str] | None,
             counted: bool = False, children: Iterable[int] = ()) -> None:
        """A task with the given pieces and peers' held counts (None: all of them); `counted`:
        with the sizes of the maps loaded in part; `children`: the pieces (of those) whose
        children in flight the rule reads (only a decision does). Asked again before its
        read ran (several calls' plans), it is read once with all that was asked."""
        k = self.k
        queued = self._specs.get(tid)
        if queued is not None:
            if not queued.read:
                queued.merge(pieces, held, counted, children)
            return  # read already: what a rule reaches for beyond it fails loudly (NotLoaded)
        spec = self._specs[tid] = _TaskSpec(pieces, held, counted, list(children))
        if self._rounds == 0 and self._clock_key is None:
            self._clock_key = k.task(tid)  # its leases are judged by its own node's clock

        def add(p: Reads) -> None:
            spec.read = True
            pieces, held, counted = spec.pieces, spec.held, spec.counted
            p.hmget(k.task(tid), *records.TASK_FIELDS, records.SEQ_VERSION)
            if pieces is None:
                p.hgetall(k.chunk(tid))
                p.hgetall(k.holders(tid))
            else:
                if counted:
                    p.hlen(k.holders(tid))
                if pieces:
                    p.hmget(k.chunk(tid), *pieces)
                    cached = [self.s.holder_sets.cached(tid, i) for i in pieces]
                    if any(cached):  # versions to send, or to learn (fields worth keeping)
                        p.holders(tid, k, pieces, cached)
                    else:
                        p.hmget(k.holders(tid), *pieces)
            if held is None:
                p.hgetall(k.held(tid))
            else:
                if counted:
                    p.hlen(k.held(tid))
                if held:
                    p.hmget(k.held(tid), *held)
            for i in spec.children:
                p.hgetall(k.children(tid, i))

        def parse(replies: list) -> None:
            pieces, held, counted = spec.pieces, spec.held, spec.counted
            asked = len(spec.children)
            kids = dict(zip(spec.children, replies[len(replies) - asked:], strict=True))
            replies = replies[:len(replies) - asked]
            meta_raw, created_at, next_epoch, version, leases_raw, trust_raw, nv = replies[0]
            tasks = self.world.state.tasks
            if meta_raw is None:
                tasks.extend({}, [tid])
                self.world.tasks[tid] = TaskBase(version=None)
                return
            base = TaskBase(version=version, meta=records.meta(meta_raw), stamp=created_at,
                            seq_version=nv, next_epoch=int(next_epoch),
                            leases=leases_raw or "",
                            trust=records.trust(trust_raw) if trust_raw else TaskTrust())
            r = iter(replies[1:])
            piece_map = Partial({}, pieces)
            if pieces is None:
                chunks, holder_map = next(r), next(r)
                rows = ((int(i), chunks.get(i), (raw, None)) for i, raw in holder_map.items())
            else:
                total = next(r) if counted else None
                rows = zip(pieces, next(r), _versioned(next(r)), strict=True) if pieces else ()
            for i, chunk, (raw, seq) in rows:
                if raw is None:  # a piece exists while it has a holders field
                    base.pieces[i] = None
                    continue
                hs = raw if type(raw) is HolderSet else self.s.holder_sets.get(
                    tid, i, raw, None if seq is None else (created_at, seq))
                loaded = kids.get(i)
                if loaded is None:
                    children: Any = unloaded()
                    before = None
                else:
                    before = records.decode_children(loaded.items())
                    children = dict(before)
                    for c, t in records.decode_legacy(hs.legacy).items():
                        children[c] = max(t, children.get(c, t))
                    children = children or None
                dict.__setitem__(piece_map, i, PieceState(chunk=chunk,
                                                          holders=LoadedHolders(hs),
                                                          children=children))
                base.pieces[i] = PieceBase(chunk, hs, before, seq is not None)
            if pieces is not None:
                piece_map.unloaded = None if total is None else \
                    max(0, total - dict.__len__(piece_map))
            if held is None:
                counts = {pid: int(c) for pid, c in next(r).items()}
                held_map = Partial(counts, None)
                base.held.update(counts)
            else:
                total = next(r) if counted else None
                values = next(r) if held else []
                counts = {pid: int(c) for pid, c in zip(held, values, strict=True)
                          if c is not None}
                held_map = Partial(counts, held, unloaded=None if total is None
                                   else max(0, total - len(counts)))
                base.held.update({pid: counts.get(pid) for pid in held})
            leases = records.LoadedLeases(self.s.lease_rows.get(tid, base.leases))
            task = TaskState(meta=base.meta, created_at=float(created_at), pieces=piece_map,
                             leases=leases, held=held_map, next_epoch=base.next_epoch,
                             trust=base.trust)
            tasks.extend({tid: task}, [tid])
            self.world.tasks[tid] = base

        self._queue(add, parse)

    def held(self, tid: str, ids: Iterable[str]) -> None:
        """More peers' held counts of a task loaded in an earlier round."""
        task = dict.get(self.world.state.tasks, tid)
        if task is None or task.held.loaded is None:
            return
        want = [pid for pid in dict.fromkeys(ids) if pid not in task.held.loaded]
        if not want:
            return

        def parse(replies: list) -> None:
            counts = {pid: int(c) for pid, c in zip(want, replies[0], strict=True)
                      if c is not None}
            task.held.extend(counts, want)
            self.world.tasks[tid].held.update({pid: counts.get(pid) for pid in want})
        self._queue(lambda p: p.hmget(self.k.held(tid), *want), parse)

    async def together(self, plans: list[Callable[[Loader], Awaitable[None]]]) -> None:
        """Several calls' plans on this one loader, each round read once for all of them:
        a round runs when every plan still planning has asked for it."""
        if len(plans) == 1:
            await plans[0](self)
            return
        self._barrier = barrier = _Barrier(len(plans), self._round)

        async def planning(plan: Callable[[Loader], Awaitable[None]]) -> None:
            try:
                await plan(self)
            finally:
                await barrier.leave()
        try:
            await gather([planning(p) for p in plans])
        finally:
            self._barrier = None

    async def run(self) -> None:
        if self._barrier is not None:
            await self._barrier.wait()
        else:
            await self._round()

    async def _round(self) -> None:
        if not self._queued and self._rounds:
            return
        queued, self._queued = self._queued, []
        first = self._rounds == 0
        server_time = first and self.s.clock is None
        reads = Reads()
        if server_time:
            reads.time()
        spans = []
        for add, _ in queued:
            start = len(reads.cmds)
            add(reads)
            spans.append((start, len(reads.cmds)))
        replies = await reads.run(self.s.read, self.s.group_of, self._clock_key)
        if server_time:
            secs, micros = replies[0]
            self.world.now = secs + micros / 1e6
        elif first:
            assert self.s.clock is not None
            self.world.now = self.s.clock()
        self._rounds += 1
        for (_, parse), (start, end) in zip(queued, spans, strict=True):
            parse(replies[start:end])

    def _add_peer(self, pid: str, values: list, flag: bool) -> None:
        w = self.world
        w.cordoned[pid] = flag
        if flag:
            w.state.cordoned.add(pid)
        found = self.s.records.get(pid, values, flag)
        peer = None if found is None else found[0]
        if found is not None:
            if pid in w.peer_tasks:
                found[0].tasks = set(w.peer_tasks[pid])
            w.peers[pid] = found[1]
        else:
            w.peers[pid] = None
            if pid in self._ghosts:  # expired: a stand-in to drop its holdings with
                w.ghosts.add(pid)
                peer = PeerState(reg=PeerRegistration.model_construct(id=pid),
                                 registered_at=0.0, last_seen=0.0,
                                 tasks=set(w.peer_tasks.get(pid, ())))
            else:
                w.peer_tasks.pop(pid, None)
        w.state.peers.extend({} if peer is None else {pid: peer}, [pid])


@dataclass
class _TaskSpec:
    """What the plans of one round asked of a task (None: all of it)."""

    pieces: list[int] | None
    held: list[str] | None
    counted: bool
    children: list[int]
    read: bool = False

    def __post_init__(self) -> None:
        self.pieces = _unique(self.pieces)
        self.held = _unique(self.held)
        self.children = list(dict.fromkeys(self.children))

    def merge(self, pieces: Iterable[int] | None, held: Iterable[str] | None,
              counted: bool, children: Iterable[int]) -> None:
        self.pieces = None if pieces is None or self.pieces is None else \
            _unique([*self.pieces, *pieces])
        self.held = None if held is None or self.held is None else \
            _unique([*self.held, *held])
        self.counted = self.counted or counted
        self.children = list(dict.fromkeys([*self.children, *children]))


def _versioned(fields: list) -> list[tuple[Any, str | None]]:
    """A `holders` or an `hmget` reply of holders fields, as (field, version)."""
    return [(f, None) for f in fields] if not fields or type(fields[0]) is not tuple \
        else fields


def _unique(items: Iterable[T] | None) -> list[T] | None:
    return None if items is None else list(dict.fromkeys(items))


class _Barrier:
    """Plans of one loader in step: each `wait()` for the next round returns once every plan
    still planning (not yet `leave()`) waits; the last to arrive runs the round for all, and
    its failure is each waiter's."""

    def __init__(self, active: int, run: Callable[[], Awaitable[None]]) -> None:
        self.active = active
        self.run = run
        self.waiting: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        await self._release()
        await fut

    async def leave(self) -> None:
        self.active -= 1
        await self._release()

    async def _release(self) -> None:
        if not self.waiting or len(self.waiting) < self.active:
            return
        waiting, self.waiting = self.waiting, []
        try:
            await self.run()
        except Exception as e:
            for fut in waiting:
                if not fut.done():
                    fut.set_exception(e)
            return
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)
