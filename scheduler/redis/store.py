"""Scheduler state in Redis, or a Redis Cluster, shared by any number of stateless replicas.

One copy of the rules. Each call reads from Redis the slice of state its rule touches (the
calling peer, the task, the pieces it names, their holders, the task's leases), builds a small
`ClusterState` holding just that slice (scheduler/redis/loader.py), runs the very method
`MemoryStore` runs, and writes back what changed (scheduler/redis/diff.py). Maps loaded in part
are `Partial`: a rule that reaches for something the store did not load raises `NotLoaded`
instead of reading it as absent, so a plan that misses data fails tests rather than deciding
wrongly.

Keys (scheduler/redis/keys.py) are hash-tagged: a task's keys share the task's slot, a peer's
keys the peer's, and the peers index and byte totals are split into shards of their own. The
same code serves one Redis and a Redis Cluster; only the client differs, and on one Redis every
key counts as one slot, so each call's writes stay one transaction, as they always were.

Atomicity: optimistic, per task. Every write to a task's keys bumps the task's version in the
same script that checks, before writing anything, that the version is still the one read (a
fence). A call that raced another replica's write is re-run on fresh state. Within one
replica, calls on the same task queue, and those that queued while one batch ran run as the
next batch: one loaded state, their rules in order, one write (`_Call`), so retries only happen
between replicas. Peer fields written by several tasks' calls are merged, not fenced:
`last_seen` and `penalty_until` only ever rise (`hmax`), load figures are last-writer-wins; a
peer's byte report is fenced on its previous report, in the counter shard holding both.

On a cluster no script spans slots, so a call's writes are applied in stages, each stage's
parts (one per slot) together, the next only once they all applied (diff.py names the stages).
Why the rules stay right at every point between stages, a replica crashing there included:
- Indexes only ever over-state before the truth and shrink after it. A peer's task list gains a
  task before the task records the peer's pieces, and loses it only after the task dropped them;
  the task list gains a task before the task exists; the peers index gains (or raises) a peer's
  entry before its record's expiry is set. An index entry with nothing behind it costs a no-op
  sweep; a holding no index names (which could outlive its peer) never exists.
- The task's fenced write is the decision. Peer fields merged after it are figures the rules
  only rank by (load, hand-outs) or deadlines that only rise; if the caller's record expired
  meanwhile its fence fails and the call is re-run, which then finds the peer unknown, as a call
  a moment later would; what the task recorded for it is swept with its other holdings (its task
  list already names the task).
- Sweeping an expired peer reads its task list, then the tasks, then checks again that the
  record is still absent: holdings read before that check belong to a session that has ended
  (a session that came back since must have announced after it, moving the tasks' versions, so
  the sweep's fenced writes fail and it re-runs, finding the peer back).
- A byte report is counted in one slot with the previous report it is fenced on, so a total
  never counts a byte twice; totals are the sum of `SHARDS` shards. Pieces sent back to the
  origin are counted last, after the decision applied (a crash just before loses one count).
- Each stage is idempotent: a call re-run after a partial apply re-derives the same writes.

Liveness: a peer's hash expires (PEXPIRE, three heartbeat intervals) unless it calls; an expired
peer is simply absent, so its pieces stop being handed out at once. `expire()` then sweeps its
holdings out of the piece maps (one replica claims each sweep with ZREM on the peer index).

Wake-ups: Redis pub/sub (scheduler/redis/feed.py).

Round trips: concurrent calls share script runs (`Batched`), one per Redis, or one per node of
a cluster (its scripts may touch several slots of their node, each part still one slot's), so a
replica serving many peers pays one round trip and one client-side command for many calls; a
call (or a batch of calls on one task) is one read per node (two rounds for `schedule`, whose
holders are known only once its pieces are read) and one write (per stage and node, on a
cluster). A schedule call carrying claims is one operation (`announce_and_schedule`), and a
decision reads the records of the sample of holders its rule weighs (`HolderSample`), not of
every holder.

Clock: Redis's own `TIME`, read with the state (from the task's slot, when the call names a
task), so replicas agree on lease and penalty deadlines whatever their host clocks say; on a
cluster a task's leases are judged by its own node's clock. Tests may inject a clock instead.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

import scheduler.state as rules
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
from common.tasks import RestartCounter, TaskSet
from scheduler.redis.diff import Tx, diff
from scheduler.redis.feed import ALL, ChangeFeed, message
from scheduler.redis.keys import B2S, SHARDS, Keys, cluster_slot, one_slot
from scheduler.redis.loader import HolderCache, Loader, Reads, World, gather
from scheduler.redis.partial import NotLoaded
from scheduler.redis.records import PEER_NAMES, LeaseCache, PeerCache
from scheduler.redis.scripts import (
    APPLY_LUA,
    CROSS_SLOT,
    DUE_LUA,
    READ_LUA,
    Batched,
    closed,
    spawn_or_fail,
)
from scheduler.state import LEASE_SPREAD, StateError, Totals, expiry_seconds
from scheduler.store import Waiters
from scheduler.waiting import wakes

log = logging.getLogger("naiad.scheduler.redis")
T = TypeVar("T")

MAX_ATTEMPTS = 100  # optimistic retries of one call before giving up (contention, not errors)
DUE_PER_SHARD = 1000  # expired peers swept per index shard per `expire()`


class StoreBusy(RuntimeError):
    """A call lost the race for its task too many times in a row."""


BATCH = 64  # calls of one task run as one, at most


@dataclass
class _Call:
    """One call of `_transact`. Calls on one task queue (a replica serving a fleet pull gets
    almost only calls on one task), and while one batch of them is read, decided and written,
    the next gathers: it is then one read and one write for all of them, which together
    read each peer's record once. Only other replicas make a call retry."""

    plan: Callable[[Loader], Awaitable[None]]
    rule: Callable[[World], Any]
    actor: str | None
    wake: str | None
    pieces: list[int] | None  # those whose long polls to wake (None: all)
    widen: Callable[[], bool] | None
    done: asyncio.Future[None] | None = None
    result: tuple[Any, StateError | None] | None = None
    error: BaseException | None = None

    def run(self, world: World) -> tuple[Any, StateError | None]:
        try:
            return self.rule(world), None
        except StateError as e:
            # What the rule did before refusing stays done, as in the memory store (a call
            # on an unknown task still renews its caller).
            return None, e

    def cancelled(self) -> bool:
        return self.done is not None and self.done.done()

    def fail(self, e: BaseException) -> None:
        """Unless it has its answer already."""
        if self.result is None and self.error is None:
            self.error = e
        self.finish()

    def finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        result, refused = self.result
        if refused is not None:
            raise refused
        return result


class _Widen:
    """A schedule plan's one widening: from a sample of each piece's holders to all of them,
    once the rule reached past its sample (rare: an unlucky sample, or one that missed the
    requester's IDC)."""

    def __init__(self) -> None:
        self.all = False

    def __call__(self) -> bool:
        widened, self.all = not self.all, True
        return widened


def _woken(ann: Announce) -> tuple[str | None, frozenset[int] | None]:
    """The task whose long polls an announcement may wake (None: none), and which of them
    (`wakes`: those asking for a piece it adds; None: all)."""
    pieces = wakes(ann)
    return (ann.task_id if pieces is None or pieces else None), pieces


Client = aioredis.Redis | aioredis.RedisCluster

# The Store calls: a cluster client's own failures (no node reachable, a slot served by no
# master during a failover) are not RedisErrors, but they mean the same: the store is
# unavailable for now (the API answers 503, and the peers retry).
_CALLS = ("register", "heartbeat", "leave", "expire", "ensure_task", "announce", "schedule",
          "announce_and_schedule", "report", "withdraw", "blob_mismatch", "cordon", "uncordon",
          "peers", "peer", "tasks", "task", "counters", "back_to_source")


def _unavailable_as_redis_errors(cls: type[T]) -> type[T]:
    def wrap(call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(call)
        async def translated(self: RedisStore, *args: Any, **kw: Any) -> Any:
            try:
                await self._connect()
                return await call(self, *args, **kw)
            except RedisClusterException as e:
                raise RedisConnectionError(f"redis cluster unavailable: {e}") from e
        return translated
    for name in _CALLS:
        setattr(cls, name, wrap(getattr(cls, name)))
    return cls


@_unavailable_as_redis_errors
class RedisStore:
    def __init__(self, client: Client, *, heartbeat_interval: float = 2.0,
                 lease_timeout: float = 2.0, clock: Callable[[], float] | None = None,
                 prefix: str = "naiad:", rng: random.Random | None = None,
                 restarts: RestartCounter | None = None) -> None:
        self.redis = client
        self.cluster = isinstance(client, aioredis.RedisCluster)
        self.slot_of = cluster_slot if self.cluster else one_slot  # a part's one slot
        self.group_of = self._node_of if self.cluster else one_slot  # runs shared by a node
        self.heartbeat_interval = heartbeat_interval
        self.lease_timeout = lease_timeout
        self.ttl_ms = max(1, round(expiry_seconds(heartbeat_interval) * 1000))
        self.clock = clock
        self.keys = Keys(prefix)
        self.rng = rng or random.Random()
        self.id = uuid.uuid4().hex[:12]
        self.waiters = Waiters(self._watch, self._unwatch)
        self.feed = ChangeFeed(client, f"{prefix}changes", self.id, self.waiters,
                               self._node_client if self.cluster else None)
        self.subscribed = self.feed.subscribed
        self._tasks = TaskSet("redis-store", restarts)
        flags = CROSS_SLOT if self.cluster else ""  # (Redis 6 knows no flags)
        stale = self._refresh_slots if self.cluster else None
        self.apply = Batched(client.register_script(flags + APPLY_LUA), self._tasks,
                             self.group_of, stale)
        self.read = Batched(client.register_script(flags + READ_LUA), self._tasks,
                            self.group_of, stale)
        self._due = client.register_script(DUE_LUA)
        self._queues: dict[str, list[_Call]] = {}  # per task: calls waiting for a batch
        self.records = PeerCache()  # decoded peer records, while their raw record is the same
        self.holder_sets = HolderCache()  # decoded holders fields, likewise
        self.lease_rows = LeaseCache()  # parsed leases fields, likewise
        self._peer_reads: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {}
        self._connected = not self.cluster
        self._connecting = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **kw: Any) -> RedisStore:
        """`cluster`: `url` names a seed node of a Redis Cluster."""
        if cluster:
            return cls(aioredis.RedisCluster.from_url(url, decode_responses=True), **kw)
        return cls(aioredis.Redis.from_url(url, decode_responses=True), **kw)

    def peer_reads(self, pid: str) -> tuple[tuple[str, str], tuple[str, str]]:
        """A peer's record and cordon reads, each (key, command encoded): a decision reads up
        to HOLDER_SAMPLE records a piece, the same commands call after call."""
        reads = self._peer_reads.get(pid)
        if reads is None:
            if len(self._peer_reads) >= 50_000:
                self._peer_reads.clear()
            record, cordon = self.keys.peer(pid), self.keys.cordon(pid)
            reads = self._peer_reads[pid] = (
                (record, json.dumps(["HMGET", record, *PEER_NAMES], separators=(",", ":"))),
                (cordon, json.dumps(["EXISTS", cordon], separators=(",", ":"))))
        return reads

    async def start(self) -> None:
        """Start listening for other replicas' changes (in the background: a Redis that is down
        now is retried, and the API answers 5xx until it is back)."""
        self._tasks.supervise("redis-changes", self.feed.listen)

    async def close(self) -> None:
        await self._tasks.close()
        await self.redis.aclose()

    async def _connect(self) -> None:
        """On a cluster, learn its map of slots once before the first call: redis-py's client
        learning it under concurrent first calls closes connections other calls are using."""
        if self._connected:
            return
        async with self._connecting:
            if not self._connected:
                await self.redis.initialize()
                self._connected = True

    async def _node_client(self, attempt: int) -> aioredis.Redis:
        """The change feed's own connection on a cluster: a node (the next one each time the
        feed is lost, so a failed node is left behind)."""
        await self._connect()
        nodes = sorted(self.redis.get_nodes(), key=lambda n: n.name)
        node = nodes[attempt % len(nodes)]
        return aioredis.Redis(host=node.host, port=node.port, decode_responses=True)

    def _node_of(self, key: str) -> Hashable:
        """The node serving `key`'s slot, as the client last heard (not yet known: the slot)."""
        slot = cluster_slot(key)
        try:
            return self.redis.nodes_manager.get_node_from_slot(slot).name
        except (LookupError, RedisClusterException):
            return slot

    async def _refresh_slots(self) -> None:
        await self.redis.nodes_manager.initialize()

    # -- wake-ups --------------------------------------------------------------------------

    async def _watch(self, task_id: str) -> None:
        await self.feed.watch(task_id)

    def _unwatch(self, task_id: str) -> None:
        self.feed.unwatch(task_id, self._tasks.spawn)

    # -- the optimistic loop ---------------------------------------------------------------

    async def _transact(self, plan: Callable[[Loader], Awaitable[None]],
                        rule: Callable[[World], T], *, lock: str | None = None,
                        actor: str | None = None, wake: str | None = None,
                        pieces: Iterable[int] | None = None,
                        widen: Callable[[], bool] | None = None) -> T:
        """Load (`plan`), decide (`rule`, one of ClusterState's methods), write back; again
        from the start if another replica changed the task meanwhile. `lock`: the task the
        call queues on, with this replica's other calls on it (`_Call` says how they run).
        `actor`: the calling peer, whose record the call renews. `wake`: the task whose long
        polls may decide otherwise now (those asking for `pieces`, if given). `widen`: the
        plan reads less than the rule may reach for (a sample of holders); when the rule
        does, `widen()` makes the plan read it all (True) and the call is planned again."""
        call = _Call(plan, rule, actor, wake, None if pieces is None else sorted(set(pieces)),
                     widen)
        if lock is None:
            await self._attempts([call])
        else:
            queue = self._queues.get(lock)
            call.done = asyncio.get_running_loop().create_future()
            if queue is None:
                self._queues[lock] = [call]
                self._spawn_drain(lock)
            else:
                queue.append(call)
            await call.done
        return call.outcome()

    def _spawn_drain(self, lock: str) -> None:
        def fail(e: BaseException) -> None:
            for c in self._queues.pop(lock):
                c.fail(e)
        spawn_or_fail(self._tasks, self._drain(lock), "redis-task-calls", fail)

    async def _drain(self, lock: str) -> None:
        """A task's queued calls, in batches of what queued while the last one ran."""
        queue = self._queues[lock]
        batch: list[_Call] = []
        try:
            while True:
                batch = [c for c in queue[:BATCH] if not c.cancelled()]
                del queue[:BATCH]
                if not batch:
                    if not queue:
                        return
                    continue
                try:
                    await self._attempts(batch)
                except Exception as e:  # the callers raise it
                    for c in batch:
                        c.fail(e)
                for c in batch:
                    c.finish()
        finally:
            del self._queues[lock]
            for c in batch + queue:  # the store closing: the callers get an answer
                c.fail(closed())

    async def _attempts(self, batch: list[_Call]) -> None:
        """Run calls as one: one loaded state (the union of their plans), their rules in
        order on it, one write. Their answers are those of running them one by one, as
        the memory store does. A rule that failed other than by refusing, or reached for
        what was not loaded, leaves nothing written: then each call runs alone."""
        for attempt in range(MAX_ATTEMPTS):
            loader = Loader(self)
            await loader.together([c.plan for c in batch])
            world = loader.world
            try:
                outcomes = [c.run(world) for c in batch]
            except Exception as e:
                if len(batch) > 1:
                    for c in batch:
                        try:
                            await self._attempts([c])
                        except Exception as alone:
                            c.fail(alone)
                    return
                widen = batch[0].widen
                if not isinstance(e, NotLoaded) or widen is None or not widen():
                    raise
                continue  # nothing written: planned again, reading what it reached for
            tx = diff(world, self.keys, self.slot_of, self.ttl_ms,
                      [c.actor for c in batch if c.actor is not None])
            woken = [c for c in batch if c.wake is not None]
            for c in woken:
                tx.publish.append([self.feed.channel_of(c.wake), message(self.id, c.wake,
                                                                         c.pieces)])
            if not tx or await self._applied(tx):
                for joined in tx.joined:
                    self.holder_sets.joined(*joined)
                for vouched in tx.vouched:
                    self.holder_sets.vouched(*vouched)
                for c in woken:  # what applied may wake others, refused or not
                    self.feed.wake(c.wake, c.pieces)
                for c, outcome in zip(batch, outcomes, strict=True):
                    c.result = outcome
                return
            # Lost a race with another replica: back off a little, at random, and redo.
            await asyncio.sleep(self.rng.uniform(0, min(0.05, 0.0005 * 2 ** attempt)))
        raise StoreBusy(f"gave up after {MAX_ATTEMPTS} conflicting attempts")

    async def _applied(self, tx: Tx) -> bool:
        """Each stage's parts together, the next once they all applied; False as soon as a
        fence failed (what applied stays: every stage is safe to apply again)."""
        for stage in tx.runs():
            results = await gather([self.apply(p.route, p.spec()) for p in stage])
            if any(results):
                return False
        return True

    # -- peers -----------------------------------------------------------------------------

    async def register(self, reg: PeerRegistration) -> None:
        k = self.keys
        exists, leftover = json.loads(await self.read(k.peer(reg.id), json.dumps(
            [["EXISTS", k.peer(reg.id)], ["SCARD", k.peer_tasks(reg.id)]])))
        if not exists and leftover:
            await self._sweep(reg.id)  # holdings of its expired session, not swept yet

        async def plan(ld: Loader) -> None:
            ld.peer(reg.id, tasks=True)
            await ld.run()
            old = dict.get(ld.world.state.peers, reg.id)
            if old is not None and reg.started_at and reg.started_at != old.reg.started_at:
                for tid in old.tasks:  # a new process: the rule drops what the old one held
                    ld.task(tid, pieces=None, held=None)
                await ld.run()
        await self._transact(plan, lambda w: w.state.register(reg, w.now), actor=reg.id)

    async def heartbeat(self, peer_id: str, hb: Heartbeat) -> None:
        async def plan(ld: Loader) -> None:
            ld.peer(peer_id)
            ld.last_counters(peer_id)
            await ld.run()
        await self._transact(plan, lambda w: w.state.heartbeat(peer_id, hb, w.now),
                             actor=peer_id)

    async def leave(self, peer_id: str) -> None:
        async def plan(ld: Loader) -> None:
            ld.peer(peer_id, tasks=True)
            await ld.run()
            for tid in ld.world.peer_tasks.get(peer_id, ()):
                ld.task(tid, pieces=None, held=None)
            await ld.run()
        await self._transact(plan, lambda w: w.state.leave(peer_id), wake=ALL)

    async def expire(self) -> list[str]:
        """Sweep the holdings of peers whose hash expired; one replica claims each sweep."""
        k = self.keys
        due = [pid for shard in await gather([
            self._due(keys=[k.index_shard(n)], args=[DUE_PER_SHARD]) for n in range(SHARDS)])
            for pid in shard]
        if not due:
            return []
        alive = await gather([self.read(k.peer(pid), json.dumps([["EXISTS", k.peer(pid)]]))
                              for pid in due])
        gone = []
        for pid, exists in zip(due, alive, strict=True):
            if json.loads(exists) == [0] and await self.redis.zrem(k.index(pid), pid):
                await self._sweep(pid)
                gone.append(pid)
        return gone

    async def _sweep(self, peer_id: str) -> None:
        """Drop an expired peer's holdings, unless it came back meanwhile."""
        async def plan(ld: Loader) -> None:
            ld.ghost(peer_id)
            await ld.run()
            if peer_id in ld.world.ghosts:
                for tid in ld.world.peer_tasks.get(peer_id, ()):
                    ld.task(tid, pieces=None, held=None)
                await ld.run()
                ld.still_gone(peer_id)
                await ld.run()

        def rule(w: World) -> None:
            if peer_id in w.ghosts:
                w.state.leave(peer_id)
        await self._transact(plan, rule, wake=ALL)

    async def cordon(self, peer_id: str) -> None:
        await self._transact(self._plan_peer(peer_id), lambda w: w.state.cordon(peer_id))

    async def uncordon(self, peer_id: str) -> None:
        await self._transact(self._plan_peer(peer_id), lambda w: w.state.uncordon(peer_id))

    @staticmethod
    def _plan_peer(peer_id: str) -> Callable[[Loader], Awaitable[None]]:
        async def plan(ld: Loader) -> None:
            ld.peer(peer_id)
            await ld.run()
        return plan

    # -- tasks -----------------------------------------------------------------------------

    async def ensure_task(self, req: TaskRequest) -> TaskMeta:
        async def plan(ld: Loader) -> None:
            ld.task(req.task_id, pieces=(), held=())
            await ld.run()
        return await self._transact(plan, lambda w: w.state.ensure_task(req, w.now),
                                    lock=req.task_id)

    async def announce(self, ann: Announce) -> AnnounceReply:
        claimed = [c.index for c in ann.pieces]

        async def plan(ld: Loader) -> None:
            ld.peer(ann.peer_id)
            ld.task(ann.task_id, pieces=claimed, held=[ann.peer_id])
            await ld.run()
            task = dict.get(ld.world.state.tasks, ann.task_id)
            if task is None:
                return
            # Whether a claimed piece's lease is live depends on its holder being alive.
            ld.peers(task.leases[i].holder for i in claimed if i in task.leases)
            await ld.run()
        wake, pieces = _woken(ann)
        return await self._transact(plan, lambda w: w.state.announce(ann, w.now),
                                    lock=ann.task_id, actor=ann.peer_id, wake=wake,
                                    pieces=pieces)

    async def schedule(self, req: ScheduleRequest) -> list[Decision]:
        return await self.waiters.schedule(req, self._decide)

    async def _decide(self, req: ScheduleRequest,
                      pieces: tuple[int, ...] | None = None) -> list[Decision]:
        return (await self._decide_with(None, req, pieces))[1]

    async def _decide_with(self, ann: Announce | None, req: ScheduleRequest,
                           pieces: tuple[int, ...] | None = None
                           ) -> tuple[AnnounceReply | None, list[Decision]]:
        """A schedule call's decision (of `pieces` of it, a parked call's re-decision, when
        given), and with `ann` the claims riding it recorded first (the order the API's two
        calls had): one plan reads for both rules, one write."""
        wanted = list(dict.fromkeys(req.pieces if pieces is None else pieces))
        claimed = [] if ann is None else [c.index for c in ann.pieces]
        widen = _Widen()

        async def plan(ld: Loader) -> None:
            # Announce's reads besides schedule's: the claimed pieces, the announcer's held
            # count, the claimed pieces' lease holders (`_plan_decide` reads them).
            ld.peer(req.peer_id)
            ld.task(req.task_id, pieces=[*claimed, *wanted], counted=True,  # cold: any holder?
                    held=() if ann is None else [ann.peer_id], children=wanted)
            await ld.run()
            self._plan_decide(ld, req, wanted, claimed, widen.all)
            await ld.run()

        def rule(w: World) -> tuple[AnnounceReply | None, list[Decision]]:
            reply = None if ann is None else w.state.announce(ann, w.now)
            return reply, w.state.schedule(req, w.now, wanted)
        wake, pieces = (None, None) if ann is None else _woken(ann)
        return await self._transact(plan, rule, lock=req.task_id, actor=req.peer_id,
                                    wake=wake, pieces=pieces, widen=widen)

    @staticmethod
    def _plan_decide(ld: Loader, req: ScheduleRequest, wanted: list[int], claimed: list[int],
                     every: bool) -> None:
        """The schedule rule's second round, once its task and pieces are loaded: the records
        of the holders it weighs (a sample of a piece's holders when it has more than
        HOLDER_SAMPLE, drawn here for the rule; `every`: all of them) and their held counts,
        the holders of the leases on the pieces it names (wanted or `claimed`: whether each
        is live), and for a requester with an IDC its pieces' children's (whose copy into its
        IDC is in flight). Every lease holder's only when the rule may count the task's live
        leases: for a task nobody holds a piece of (cold, unless a lease is live), or a wanted
        piece nobody holds when the requester's room beside the others' leases counts them
        (`ClusterState._lease_room`: a requester without an IDC; with one, whether a peer of
        another IDC leases, `_leased_elsewhere`); loading them on every call
        made a call's cost grow with the task's live leases (bench.redis_calls --lessees 1024:
        2.95 ms a call against 0.52 ms without them)."""
        task = dict.get(ld.world.state.tasks, req.task_id)
        if task is None:
            return
        pieces = [p for i in wanted if (p := dict.get(task.pieces, i)) is not None]
        if every:
            weighed = {h for p in pieces for h in p.holders}
        else:
            weighed = {h for p in pieces for h in ld.sample.choose(p.holders)}
        leases = task.leases
        me = dict.get(ld.world.state.peers, req.peer_id)
        # (_lease_room's own test; with an IDC label, whether another IDC leases: LEASE_IDC,
        # read per call: an experiment or a test sets it in the module)
        counts = LEASE_SPREAD if me is None or not me.reg.idc else rules.LEASE_IDC
        if every or not task.held or (counts and (len(pieces) < len(wanted)
                                                 or not all(p.holders for p in pieces))):
            ld.peers(weighed | {le.holder for le in leases.values()})
        else:
            ld.peers(weighed | {le.holder for i in (*wanted, *claimed)
                                if (le := leases.get(i)) is not None})
        if me is not None and me.reg.idc:
            ld.peers({c for p in pieces for c in p.children or ()
                      if c not in p.holders})
        ld.held(req.task_id, weighed)

    async def announce_and_schedule(self, ann: Announce, req: ScheduleRequest
                                    ) -> tuple[AnnounceReply, list[Decision]]:
        """`announce(ann)` then `schedule(req)`, with the same answers, but the first decision
        and the announcement are one store operation: one loaded state, one write (a schedule
        call carrying its peer's claims is the commonest call; two operations were two reads
        and two transactions). A long poll then re-decides as `schedule` does."""
        if ann.task_id != req.task_id or ann.peer_id != req.peer_id:
            reply = await self.announce(ann)
            return reply, await self.schedule(req)
        replies: list[AnnounceReply] = []

        async def decide(r: ScheduleRequest, pieces: tuple[int, ...] | None
                         ) -> list[Decision]:
            if replies:
                return await self._decide(r, pieces)
            reply, decisions = await self._decide_with(ann, r, pieces)
            assert reply is not None
            replies.append(reply)
            return decisions
        decisions = await self.waiters.schedule(req, decide)
        if not replies:  # answered with waits a poll before it left, undecided: claims count
            replies.append(await self.announce(ann))
        return replies[0], decisions

    async def report(self, rep: Report) -> None:
        corrupt_piece = rep.kind == "corrupt" and rep.piece is not None

        async def plan(ld: Loader) -> None:
            ld.peer(rep.peer_id)
            ld.peer(rep.parent_id)
            if corrupt_piece:
                ld.task(rep.task_id, pieces=[rep.piece], held=[rep.parent_id])
            await ld.run()
        await self._transact(plan, lambda w: w.state.report(rep, w.now),
                             lock=rep.task_id if corrupt_piece else None)

    async def withdraw(self, wd: Withdraw) -> None:
        async def plan(ld: Loader) -> None:
            ld.peer(wd.peer_id)
            ld.task(wd.task_id, pieces=wd.pieces, held=[wd.peer_id])
            await ld.run()
        await self._transact(plan, lambda w: w.state.withdraw(wd), lock=wd.task_id)

    async def blob_mismatch(self, peer_id: str, task_id: str,
                            registry: str | None = None) -> None:
        async def plan(ld: Loader) -> None:
            ld.peer(peer_id)
            ld.task(task_id, pieces=(), held=())
            await ld.run()
            task = dict.get(ld.world.state.tasks, task_id)
            if task is not None:
                ld.peers(task.trust.authors)  # flagged when the map is reset
                await ld.run()
        await self._transact(plan,
                             lambda w: w.state.blob_mismatch(peer_id, task_id, w.now, registry),
                             lock=task_id, wake=task_id)

    # -- views -----------------------------------------------------------------------------

    async def peers(self) -> list[dict]:
        reads = Reads()
        for n in range(SHARDS):
            reads.zrange(self.keys.index_shard(n))
        shards = await reads.run(self.read, self.group_of)
        return await self._peer_views(sorted({pid for ids in shards for pid in ids}))

    async def peer(self, peer_id: str) -> dict | None:
        views = await self._peer_views([peer_id])
        return views[0] if views else None

    async def _peer_views(self, ids: list[str]) -> list[dict]:
        if not ids:
            return []
        ld = Loader(self)
        ld.peers(ids)
        counts = ld.task_counts(ids)
        await ld.run()
        st, out = ld.world.state, []
        for pid in ids:
            peer = dict.get(st.peers, pid)
            if peer is not None:
                view = st.peer_view(peer, ld.world.now)
                view["tasks"] = counts[pid]  # how many, not which: not loaded
                out.append(view)
        return out

    async def tasks(self) -> list[dict]:
        ids = sorted(await self.redis.smembers(self.keys.tasks))
        ld = Loader(self)
        for tid in ids:
            ld.task(tid, pieces=(), held=None, counted=True)
        await ld.run()
        st = ld.world.state
        return [st.task_view(t, detail=False) for tid in ids
                if (t := dict.get(st.tasks, tid)) is not None]

    async def task(self, task_id: str) -> dict | None:
        ld = Loader(self)
        ld.task(task_id, pieces=None, held=None)
        await ld.run()
        t = dict.get(ld.world.state.tasks, task_id)
        return None if t is None else ld.world.state.task_view(t, detail=True)

    async def _shard_sums(self, fields: list[str]) -> list[int]:
        """`fields` summed over the counter shards."""
        reads = Reads()
        for n in range(SHARDS):
            reads.hmget(self.keys.counter_shard(n), *fields)
        sums = [0] * len(fields)
        for values in await reads.run(self.read, self.group_of):
            for i, v in enumerate(values):
                sums[i] += int(v or 0)
        return sums

    async def counters(self) -> dict[str, int]:
        names = list(Totals().total)
        return dict(zip(names, await self._shard_sums(names), strict=True))

    async def back_to_source(self) -> int:
        (n,) = await self._shard_sums([B2S])
        return n
