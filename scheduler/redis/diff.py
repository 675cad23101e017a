"""The writes that turn what a call loaded into what its rule left: per slot, in stages.

A Redis Cluster runs a script on one slot only, so a call's writes are parts, one per slot,
applied stage by stage (see the store's docstring for why each intermediate state is safe):

PRE    what only ever indexes more than is true: the task list, a peer's task list (`sadd`),
       the peers index (`zaddttl`). Idempotent, unfenced.
TASK   each task's writes, fenced on its version: the optimistic transaction.
PEER   peer fields merged (`hmax`, last-writer-wins `hsetx`), the record's expiry renewed,
       cordons; fenced on the record existing (the caller) or being absent (a sweep).
POST   what may only shrink once the tasks no longer point at it: a peer's task list and its
       index entry; a peer's byte report, fenced on its previous one.
COUNT  counters nothing depends on (pieces sent back to the origin), once all else applied.

When every part of a call falls in one slot (always, on one Redis), they are one part: the
call is one transaction, checked whole before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from common.pieces import piece_count
from scheduler.redis import records
from scheduler.redis.keys import B2S, Keys, SlotOf, last_field
from scheduler.redis.loader import VERSIONED, HolderSet, LoadedHolders, Seq, TaskBase, World
from scheduler.redis.partial import Partial
from scheduler.redis.scripts import ARGS_PER_OP
from scheduler.state import TaskState

PRE, TASK, PEER, POST, COUNT = range(5)


@dataclass
class Part:
    """One slot's fences and writes, applied whole or not at all (the apply script)."""

    route: str  # a key of the slot: where the part runs
    fences: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    ops: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    publish: list[list[str]] = field(default_factory=list)

    def spec(self) -> str:
        keys: list[str] = []
        index: dict[str, int] = {}

        def k(key: str) -> int:
            n = index.get(key)
            if n is None:
                keys.append(key)
                n = index[key] = len(keys)
            return n
        fences = [[kind, k(key), fld, exp if exp is not None else False]
                  for kind, key, fld, exp in self.fences]
        ops = [[name, k(key), *args] for name, key, args in self.ops]
        return json.dumps({"k": keys, "f": fences, "o": ops, "p": self.publish},
                          separators=(",", ":"))


class Tx:
    def __init__(self, slot_of: SlotOf) -> None:
        self.slot_of = slot_of
        self.stages: list[dict[int, Part]] = [{} for _ in range(COUNT + 1)]
        self.publish: list[list[str]] = []
        # Holders fields claims appended to, once applied: (task, piece, as loaded, joined,
        # the version the write gives the field).
        self.joined: list[tuple[str, int, HolderSet, frozenset[str], Seq]] = []
        # Fields loaded as they were, the version the write gives them: (task, piece, set, it).
        self.vouched: list[tuple[str, int, HolderSet, Seq]] = []

    def _part(self, stage: int, key: str) -> Part:
        slot = self.slot_of(key)
        part = self.stages[stage].get(slot)
        if part is None:
            part = self.stages[stage][slot] = Part(key)
        return part

    def fence(self, stage: int, kind: str, key: str, fld: str = "",
              expected: str | None = None) -> None:
        self._part(stage, key).fences.append((kind, key, fld, expected))

    def op(self, stage: int, name: str, key: str, *args: str) -> None:
        ops = self._part(stage, key).ops
        for n in range(0, max(1, len(args)), ARGS_PER_OP):
            ops.append((name, key, args[n:n + ARGS_PER_OP]))

    def __bool__(self) -> bool:
        return bool(self.publish) or any(self.stages)

    def runs(self) -> list[list[Part]]:
        """The parts to apply, stage by stage (wake-ups sent with the last)."""
        stages = [list(s.values()) for s in self.stages if s]
        if not stages:
            stages = [[Part("-")]]  # a wake-up alone
        if len({self.slot_of(p.route) for s in stages for p in s}) == 1:
            whole = Part(stages[0][0].route)
            for s in stages:
                for p in s:
                    whole.fences += p.fences
                    whole.ops += p.ops
            stages = [[whole]]
        stages[-1][0].publish += self.publish
        return stages


def diff(w: World, keys: Keys, slot_of: SlotOf, ttl_ms: int, actors: list[str]) -> Tx:
    """The writes that turn what was loaded into what the rules left, with fences on what
    they depend on. `actors`: the calling peers, whose records are renewed."""
    tx = Tx(slot_of)
    st = w.state
    for pid, before in w.peers.items():
        after = dict.get(st.peers, pid)
        key = keys.peer(pid)
        if after is None:
            if before is not None or pid in w.ghosts:  # left, or swept after expiry
                if pid in w.ghosts:
                    tx.fence(PEER, "absent", key)  # it came back meanwhile: not ours to sweep
                tx.op(PEER, "del", key)
                tx.op(PEER, "del", keys.peer_tasks(pid))
                tx.op(POST, "zrem", keys.index(pid), pid)
            continue
        values = records.peer_values(after)
        if before is None:  # registered
            tx.op(PEER, "hset", key, *records.peer_hash(after))
        else:
            for fld, old, new in zip(records.PEER_FIELDS, before, values, strict=True):
                if old is not new and old != new:
                    tx.op(PEER, fld.op, key, fld.name, fld.encode(new))
        added = after.tasks - w.peer_tasks.get(pid, frozenset())
        if added:
            tx.op(PRE, "sadd", keys.peer_tasks(pid), *sorted(added))
        gone = w.peer_tasks[pid] - after.tasks if pid in w.peer_tasks else ()
        if gone:  # holdings dropped (a new process of the peer)
            tx.op(POST, "srem", keys.peer_tasks(pid), *sorted(gone))
    for actor in dict.fromkeys(actors):
        if dict.get(st.peers, actor) is None:
            continue
        if w.peers.get(actor) is not None:
            tx.fence(PEER, "exists", keys.peer(actor))
        tx.op(PRE, "zaddttl", keys.index(actor), str(ttl_ms), actor)
        tx.op(PEER, "pexpire", keys.peer(actor), str(ttl_ms))
    for tid, base in w.tasks.items():
        _diff_task(tx, keys, tid, base, dict.get(st.tasks, tid))
    for pid, was in w.cordoned.items():
        now = pid in st.cordoned
        if now != was:
            if now:
                tx.op(PEER, "set", keys.cordon(pid), "1")
            else:
                tx.op(PEER, "del", keys.cordon(pid))
    reported = None
    for pid, raw in w.last_counters.items():
        after = dict.get(st.totals.last, pid)
        if after is not None and (raw is None or after.model_dump_json() != raw):
            shard, reported = keys.counters(pid), pid
            tx.fence(POST, "eq", shard, last_field(pid), raw)
            tx.op(POST, "hset", shard, last_field(pid), after.model_dump_json())
    for name, delta in st.totals.total.items():
        if delta:  # what one peer's report added: counted with that report, in its shard
            assert reported is not None, "byte totals change only with a peer's report"
            tx.op(POST, "hincrby", keys.counters(reported), name, str(delta))
    if st.back_to_source:
        tx.op(COUNT, "hincrby", keys.counters(actors[0] if actors else ""), B2S,
              str(st.back_to_source))
    return tx


def _diff_task(tx: Tx, keys: Keys, tid: str, before: TaskBase,
               task: TaskState | None) -> None:
    if task is None:
        return  # rules never delete a task
    key = keys.task(tid)
    version = str(int(before.version or 0) + 1)  # what this write makes it, if it writes
    writes: list[str] = []
    # A lease table the rules left as loaded is not encoded again (nor decoded whole).
    kept = before.version is not None and type(task.leases) is records.LoadedLeases \
        and task.leases.unchanged()
    leases = before.leases if kept else records.encode_leases(task.leases)
    if before.version is None:
        assert task.meta is not None
        tx.fence(TASK, "eq", key, "v", None)  # created by one replica only
        tx.op(PRE, "sadd", keys.tasks, tid)
        writes += ["meta", task.meta.model_dump_json(), "created_at", records.f(task.created_at),
                   "next_epoch", str(task.next_epoch), "leases", leases,
                   "trust", task.trust.model_dump_json()]
    else:
        if task.meta != before.meta:
            writes += ["meta", task.meta.model_dump_json()]
        if task.trust != before.trust:
            writes += ["trust", task.trust.model_dump_json()]
        if task.next_epoch != before.next_epoch:
            writes += ["next_epoch", str(task.next_epoch)]
        if leases != before.leases:
            writes += ["leases", leases]
    chunk_set: list[str] = []
    chunk_del: list[str] = []
    holders_set: list[str] = []
    holders_del: list[str] = []
    holders_add: list[str] = []  # field, ids: appended to what the field holds
    children: list[tuple[str, str, list[str]]] = []  # ops on pieces' children hashes
    pieces: Any = task.pieces
    cleared = isinstance(pieces, Partial) and pieces.cleared
    if cleared:
        tx.op(TASK, "del", keys.chunk(tid))
        tx.op(TASK, "del", keys.holders(tid))
        assert before.meta is not None
        for index in range(piece_count(before.meta.length, before.meta.piece_size)):
            children.append(("del", keys.children(tid, index), []))
    for index in set(before.pieces) | set(dict.keys(pieces)):
        old = None if cleared else before.pieces.get(index)
        piece = dict.get(pieces, index)
        if piece is None:
            if old is not None:
                chunk_del.append(str(index))
                holders_del.append(str(index))
                children.append(("del", keys.children(tid, index), []))
            continue
        if piece.chunk is not None:
            if old is None or old.chunk != piece.chunk:
                chunk_set += [str(index), piece.chunk]
        elif old is not None and old.chunk is not None:
            chunk_del.append(str(index))
        loaded = old is None or not isinstance(piece.children, Partial)  # the rule's to write
        moved = loaded and old is not None and bool(old.holders.legacy)
        if old is None or moved:
            holders_set += [str(index), records.encode_holders(piece.holders)]
        elif not _same(piece.holders, old.holders):
            added = piece.holders - old.holders.base
            if added and len(added) + len(old.holders.base) == len(piece.holders):
                # Only joined (a claim): appended, not the whole field written again.
                holders_add += [str(index), records.encode_holders(added)]
                tx.joined.append((tid, index, old.holders, frozenset(added),
                                  (before.stamp, version)))
            else:  # an earlier layout's children stay in the field until they are moved
                legacy = "|" + old.holders.legacy if old.holders.legacy else ""
                holders_set += [str(index), records.encode_holders(piece.holders) + legacy]
        if loaded:
            _diff_children(children, keys.children(tid, index),
                           {} if old is None or old.children is None else old.children,
                           piece.children or {})
    held_set: list[str] = []
    held_del: list[str] = []
    held: Any = task.held
    held_cleared = isinstance(held, Partial) and held.cleared
    if held_cleared:
        tx.op(TASK, "del", keys.held(tid))
    for pid in set(before.held) | set(dict.keys(held)):
        old = None if held_cleared else before.held.get(pid)
        count = dict.get(held, pid)
        if count is None:
            if old is not None:
                held_del.append(pid)
        elif count != old:
            held_set += [pid, str(count)]
    changed = bool(writes or chunk_set or chunk_del or holders_set or holders_del
                   or holders_add or held_set or held_del or cleared or held_cleared
                   or children)
    if not changed:
        return
    if before.version is not None:
        tx.fence(TASK, "eq", key, "v", before.version)
    # The holders fields' versions (keys.holders_seq): those this write changes get this
    # version; after another layout's write (it left `nv` behind `v`) none is known any more.
    writes += ["v", version, records.SEQ_VERSION, version]
    tx.op(TASK, "hset", key, *writes)
    seqs = keys.holders_seq(tid)
    if cleared or (before.version is not None and before.seq_version != before.version):
        tx.op(TASK, "del", seqs)
    written = [*holders_set[::2], *holders_add[::2]]
    # Fields loaded without a version (written by an earlier layout, or before this one ran)
    # get one too: read in one snapshot with the version this write is fenced on, they are
    # still as loaded. Only those whose versions are checked (HolderCache.versioned).
    done = set(written) | set(holders_del)
    for index, old in ([] if cleared else before.pieces.items()):
        if old is not None and not old.versioned and len(old.holders.raw) >= VERSIONED \
                and str(index) not in done:
            written.append(str(index))
            tx.vouched.append((tid, index, old.holders, (before.stamp, version)))
    if written:
        tx.op(TASK, "hset", seqs, *[x for i in written for x in (i, version)])
    if holders_del:
        tx.op(TASK, "hdel", seqs, *holders_del)
    for name, k, args in (("hset", keys.chunk(tid), chunk_set),
                          ("hdel", keys.chunk(tid), chunk_del),
                          ("hset", keys.holders(tid), holders_set),
                          ("hdel", keys.holders(tid), holders_del),
                          ("happend", keys.holders(tid), holders_add),
                          ("hset", keys.held(tid), held_set),
                          ("hdel", keys.held(tid), held_del)):
        if args:
            tx.op(TASK, name, k, *args)
    for name, k, args in children:
        tx.op(TASK, name, k, *args)


def _same(holders: set[str], loaded: HolderSet) -> bool:
    if type(holders) is LoadedHolders and holders.unchanged() is loaded:
        return True  # no rule touched them: not compared id by id
    return holders == loaded.base


def _diff_children(out: list[tuple[str, str, list[str]]], key: str, before: dict[str, float],
                   after: dict[str, float]) -> None:
    """A piece's children hash: the entries a decision changed (most admit one child)."""
    if not after:
        if before:
            out.append(("del", key, []))
        return
    changed = [x for c, t in after.items() if before.get(c) != t for x in (c, records.f(t))]
    gone = [c for c in before if c not in after]
    if changed:
        out.append(("hset", key, changed))
    if gone:
        out.append(("hdel", key, gone))
