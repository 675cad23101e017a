"""Scheduler state in Redis, shared by any number of stateless scheduler replicas.

One copy of the rules. Each call reads from Redis the slice of state its rule touches (the
calling peer, the task, the pieces it names, their holders, the task's leases), builds a small
`ClusterState` holding just that slice, runs the very method `MemoryStore` runs, and writes back
what changed. Maps loaded in part are `Partial`: a rule that reaches for something the store did
not load raises `NotLoaded` instead of reading it as absent, so a plan that misses data fails
tests rather than deciding wrongly.

Atomicity: optimistic, per task. Every write to a task's keys bumps the task's version in the
same Lua script that checks, before writing anything, that the version is still the one read
(a fence). A call that raced another replica's write is re-run on fresh state. Within one
replica, calls on the same task also queue on a local lock, so retries only happen between
replicas. Peer fields written by several tasks' calls are merged, not fenced: `last_seen` and
`penalty_until` only ever rise (`hmax`), load figures are last-writer-wins; counters are fenced
on the peer's last report.

Liveness: a peer's hash expires (PEXPIRE, three heartbeat intervals) unless it calls; an expired
peer is simply absent, so its pieces stop being handed out at once. `expire()` then sweeps its
holdings out of the piece maps (one replica claims each sweep with ZREM on the peer index).

Wake-ups: Redis pub/sub. A write that can unblock waiters publishes on its task's channel (a
peer leaving, on a broadcast channel). Each replica has one subscriber connection, subscribed
to the channels of the tasks it has long polls on, so a replica hears only of what it waits for
(publishing to a channel nobody listens to costs Redis next to nothing), and a long poll that
starts waiting subscribes, waits for Redis to confirm, then decides again, so a change in
between is not missed. Pub/sub delivers at most once: a lost message (a dropped connection)
costs at most `RECHECK_SECONDS`, the long polls' periodic re-decision. Polling a version counter
instead would cost every waiting call a Redis read per poll interval, and its interval in
latency.

Round trips: concurrent calls share script runs (`_Batched`), so a replica serving many peers
pays one round trip and one client-side command for many calls; a call itself is one read
(two for `schedule`, whose holders are known only once its pieces are read) and one write.

Clock: Redis's own `TIME`, read with the state, so replicas agree on lease and penalty deadlines
whatever their host clocks say. Tests may inject a clock instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.models import (
    Announce,
    AnnounceReply,
    Decision,
    Heartbeat,
    PeerCounters,
    PeerLoad,
    PeerRegistration,
    Report,
    ScheduleRequest,
    TaskMeta,
    TaskRequest,
    Withdraw,
)
from common.tasks import RestartCounter, TaskSet
from scheduler.state import (
    ClusterState,
    Lease,
    PeerState,
    PieceState,
    TaskState,
    TaskTrust,
    Totals,
    expiry_seconds,
)
from scheduler.store import Waiters

log = logging.getLogger("naiad.scheduler.redis")
T = TypeVar("T")

MAX_ATTEMPTS = 100  # optimistic retries of one call before giving up (contention, not errors)
ALL = "*"  # wake-up payload: every waiter re-decides (a peer left: its leases are free)

PEER_FIELDS = ("reg", "registered_at", "last_seen", "load", "counters", "penalty_until",
               "penalty_reason", "handouts", "handouts_at")
TASK_FIELDS = ("meta", "created_at", "next_epoch", "v", "leases", "trust")

# Writes, fenced. Each ARGV is one call's transaction, JSON: {"k": [keys], "f": [[kind, key#,
# field, expected]...], "o": [[op, key#, args...]...], "p": [[channel, message]...]}. A fence is
# 'eq' (a hash field equals `expected`; false: absent), 'exists' or 'absent'; a transaction's
# fences are all checked before any of its writes, so it applies whole or not at all. Returns,
# per transaction, 0 when applied, else the 1-based number of the fence that failed. (Keys are
# named in ARGV, not KEYS, so that concurrent calls share one script run: one Redis, not a
# Redis Cluster.)
APPLY_LUA = """
local results, now_ms = {}, nil
for j = 1, #ARGV do
  local spec = cjson.decode(ARGV[j])
  local K, failed = spec.k, 0
  for i, f in ipairs(spec.f) do
    local key, ok = K[f[2]], false
    if f[1] == 'eq' then
      ok = redis.call('HGET', key, f[3]) == f[4]
    elseif f[1] == 'exists' then
      ok = redis.call('EXISTS', key) == 1
    else
      ok = redis.call('EXISTS', key) == 0
    end
    if not ok then failed = i; break end
  end
  if failed == 0 then
    for _, o in ipairs(spec.o) do
      local op, key = o[1], K[o[2]]
      if op == 'hset' then
        redis.call('HSET', key, unpack(o, 3))
      elseif op == 'hsetx' then
        if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, unpack(o, 3)) end
      elseif op == 'hmax' then
        if redis.call('EXISTS', key) == 1 then
          local cur = tonumber(redis.call('HGET', key, o[3]))
          if cur == nil or cur < tonumber(o[4]) then redis.call('HSET', key, o[3], o[4]) end
        end
      elseif op == 'hdel' then
        redis.call('HDEL', key, unpack(o, 3))
      elseif op == 'hincrby' then
        redis.call('HINCRBY', key, o[3], o[4])
      elseif op == 'incrby' then
        redis.call('INCRBY', key, o[3])
      elseif op == 'sadd' then
        redis.call('SADD', key, unpack(o, 3))
      elseif op == 'srem' then
        redis.call('SREM', key, unpack(o, 3))
      elseif op == 'del' then
        redis.call('DEL', key)
      elseif op == 'zrem' then
        redis.call('ZREM', key, o[3])
      elseif op == 'touch' then
        if redis.call('PEXPIRE', key, o[3]) == 1 then
          if not now_ms then
            local t = redis.call('TIME')
            now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
          end
          redis.call('ZADD', K[o[4]], 'GT', now_ms + tonumber(o[3]), o[5])
        end
      end
    end
    for _, p in ipairs(spec.p) do redis.call('PUBLISH', p[1], p[2]) end
  end
  results[j] = failed
end
return results
"""
# Reads. Each ARGV is one call's read commands (JSON: [[command, args...]...]), run atomically,
# so a task is read as one snapshot; each call's replies come back as one JSON document: one
# bulk string to parse rather than one per field, which is most of a pure-Python client's cost.
READ_LUA = """
local outs = {}
for j = 1, #ARGV do
  local out = {}
  for i, c in ipairs(cjson.decode(ARGV[j])) do out[i] = redis.call(unpack(c)) end
  outs[j] = cjson.encode(out)
end
return outs
"""
_ARGS_PER_OP = 2000  # Lua's unpack() is limited to a few thousand values


class NotLoaded(LookupError):
    """A rule touched state its store did not load for it: a bug in the store's plan."""


class Partial(dict):
    """A map loaded for some keys only (`loaded`; None: all of it).

    Reading or writing a key that was not loaded raises `NotLoaded` (it would otherwise read as
    absent). `len` counts the entries not loaded too (`unloaded`, when the store counted them;
    None: it did not, and `len` raises), so `not m` stays right; iterating needs the whole map;
    `clear` empties all of it (the store deletes the Redis hash).
    """

    __slots__ = ("cleared", "loaded", "unloaded")

    def __init__(self, entries: dict, loaded: Iterable | None, unloaded: int | None = 0
                 ) -> None:
        super().__init__(entries)
        self.loaded = None if loaded is None else set(loaded)
        self.unloaded = unloaded
        self.cleared = False

    def _check(self, key: object) -> None:
        if self.loaded is not None and key not in self.loaded:
            raise NotLoaded(key)

    def extend(self, entries: dict, loaded: Iterable) -> None:
        """Entries loaded in a later round, which `unloaded` counted so far."""
        if self.loaded is None:
            return
        fresh = [k for k in loaded if k not in self.loaded]
        self.loaded.update(fresh)
        found = {k: entries[k] for k in fresh if k in entries}
        dict.update(self, found)
        if self.unloaded is not None:
            self.unloaded = max(0, self.unloaded - len(found))

    def _whole(self) -> None:
        if self.unloaded != 0:
            raise NotLoaded("iterating a map loaded in part")

    def __getitem__(self, key: Any) -> Any:
        self._check(key)
        return dict.__getitem__(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: Any) -> None:
        self._check(key)
        dict.__delitem__(self, key)

    def __contains__(self, key: object) -> bool:
        self._check(key)
        return dict.__contains__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._check(key)
        return dict.get(self, key, default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._check(key)
        return dict.setdefault(self, key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self._check(key)
        return dict.pop(self, key, *default)

    def __len__(self) -> int:
        if self.unloaded is None:
            raise NotLoaded("the size of a map loaded in part, not counted")
        return dict.__len__(self) + self.unloaded

    def __iter__(self):
        self._whole()
        return dict.__iter__(self)

    def keys(self):
        self._whole()
        return dict.keys(self)

    def values(self):
        self._whole()
        return dict.values(self)

    def items(self):
        self._whole()
        return dict.items(self)

    def clear(self) -> None:
        dict.clear(self)
        self.loaded = None  # known now: empty
        self.unloaded = 0
        self.cleared = True


class _Batched:
    """Calls of one script made in the same turn of the event loop, sent as one script run:
    a replica serving many peers pays one round trip, and one client-side command, for many
    calls. Each call is one ARGV; the script answers a list, one reply per call."""

    LIMIT = 64  # calls per run: bounds how long one run holds Redis

    def __init__(self, script: Any, tasks: TaskSet) -> None:
        self.script = script
        self.tasks = tasks
        self._pending: list[tuple[str, asyncio.Future]] = []

    async def __call__(self, arg: str) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((arg, fut))
        if len(self._pending) >= self.LIMIT:
            self._flush()
        elif len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            self.tasks.spawn(self._send(batch), "redis-script")

    async def _send(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        try:
            replies = await self.script(args=[arg for arg, _ in batch])
        except Exception as e:  # handed to every caller, who raises it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        except BaseException:
            for _, fut in batch:
                fut.cancel()
            raise
        for (_, fut), reply in zip(batch, replies, strict=True):
            if not fut.done():
                fut.set_result(reply)


class StoreBusy(RuntimeError):
    """A call lost the race for its task too many times in a row."""


# -- encoding --------------------------------------------------------------------------------

def _f(value: float) -> str:
    return repr(float(value))


def encode_piece(piece: PieceState) -> str:
    """A piece's field in the holders hash: `a,b`, then `|c=t,d=t` while children are in
    flight (peer ids cannot hold `,`, `|` or `=`)."""
    out = ",".join(sorted(piece.holders))
    if piece.children:
        out += "|" + ",".join(f"{c}={_f(t)}" for c, t in sorted(piece.children.items()))
    return out


def decode_piece(chunk: str | None, raw: str) -> PieceState:
    holders, _, children = raw.partition("|")
    return PieceState(chunk=chunk, holders=set(holders.split(",")) if holders else set(),
                      children={c: float(t) for c, _, t in
                                (kv.partition("=") for kv in children.split(","))}
                      if children else None)


def encode_leases(leases: dict[int, Lease]) -> str:
    """A task's lease table, canonical (equal tables encode equal): pieces share Lease objects,
    one per run, so a run is written once with the pieces it still covers."""
    runs: dict[int, tuple[Lease, list[int]]] = {}
    for index, lease in leases.items():
        runs.setdefault(id(lease), (lease, []))[1].append(index)
    if not runs:
        return ""
    rows = sorted([le.epoch, le.holder, le.first, le.last, le.progress_at, sorted(pieces)]
                  for le, pieces in runs.values())
    return json.dumps(rows, separators=(",", ":"))


def decode_leases(raw: str | None) -> dict[int, Lease]:
    leases: dict[int, Lease] = {}
    for epoch, holder, first, last, progress_at, pieces in json.loads(raw) if raw else ():
        lease = Lease(holder=holder, epoch=epoch, first=first, last=last,
                      progress_at=progress_at)
        for index in pieces:
            leases[index] = lease
    return leases


class _Parsed:
    """JSON fields that rarely change, parsed once per distinct value."""

    def __init__(self, model: Any, limit: int = 100_000) -> None:
        self.model = model
        self.limit = limit
        self.cache: dict[str, Any] = {}

    def __call__(self, raw: str) -> Any:
        value = self.cache.get(raw)
        if value is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            value = self.cache[raw] = self.model.model_validate_json(raw)
        return value


_reg = _Parsed(PeerRegistration)
_load = _Parsed(PeerLoad)
_counters = _Parsed(PeerCounters)
_meta = _Parsed(TaskMeta)
_trust = _Parsed(TaskTrust)


def _peer_values(peer: PeerState) -> tuple:
    return (peer.reg, peer.registered_at, peer.last_seen, peer.load, peer.counters,
            peer.penalty_until, peer.penalty_reason, peer.handouts, peer.handouts_at)


def _peer_field(value: Any) -> str:
    """One of `_peer_values`, as stored."""
    if isinstance(value, float | int):
        return _f(value)
    return value if isinstance(value, str) else value.model_dump_json()


def _peer_from(values: list[str | None], cordoned: bool) -> PeerState | None:
    if any(v is None for v in values):  # absent, or not a whole record
        return None
    reg, reg_at, seen, load, counters, pen_until, pen_reason, handouts, handouts_at = values
    return PeerState(reg=_reg(reg), registered_at=float(reg_at), last_seen=float(seen),
                     load=_load(load), counters=_counters(counters), cordoned=cordoned,
                     penalty_until=float(pen_until), penalty_reason=pen_reason,
                     handouts=float(handouts), handouts_at=float(handouts_at))


# How each changed peer field is written: raised only (several replicas may write it),
# or set while the peer exists (never recreating an expired peer's hash).
_PEER_OPS = ("hsetx", "hsetx", "hmax", "hsetx", "hsetx", "hmax", "hsetx", "hsetx", "hsetx")


# -- one call's slice of state ---------------------------------------------------------------

@dataclass
class _TaskBase:
    """A task as loaded, to diff the rule's result against."""

    version: str | None  # None: the task did not exist
    meta: TaskMeta | None = None
    next_epoch: int = 1
    leases: str = ""
    trust: TaskTrust = field(default_factory=TaskTrust)
    pieces: dict[int, tuple[str | None, str] | None] = field(default_factory=dict)  # encoded
    held: dict[str, int | None] = field(default_factory=dict)


@dataclass
class _World:
    state: ClusterState
    now: float = 0.0
    peers: dict[str, tuple | None] = field(default_factory=dict)  # loaded values; None: absent
    peer_tasks: dict[str, frozenset[str]] = field(default_factory=dict)
    ghosts: set[str] = field(default_factory=set)  # expired peers whose holdings are swept
    tasks: dict[str, _TaskBase] = field(default_factory=dict)
    cordoned: dict[str, bool] = field(default_factory=dict)
    last_counters: dict[str, str | None] = field(default_factory=dict)


class _Tx:
    """Fences and writes for the apply script."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self.fences: list[list] = []
        self.ops: list[list] = []
        self.publish: list[list[str]] = []

    def _k(self, key: str) -> int:
        n = self._index.get(key)
        if n is None:
            self.keys.append(key)
            n = self._index[key] = len(self.keys)
        return n

    def fence(self, kind: str, key: str, fld: str = "", expected: str | None = None) -> None:
        self.fences.append([kind, self._k(key), fld, expected if expected is not None else False])

    def op(self, name: str, key: str, *args: str) -> None:
        for k in range(0, max(1, len(args)), _ARGS_PER_OP):
            self.ops.append([name, self._k(key), *args[k:k + _ARGS_PER_OP]])

    def touch(self, key: str, ttl_ms: int, index: str, member: str) -> None:
        self.ops.append(["touch", self._k(key), str(ttl_ms), self._k(index), member])

    def __bool__(self) -> bool:
        return bool(self.ops or self.publish)

    def spec(self) -> str:
        return json.dumps({"k": self.keys, "f": self.fences, "o": self.ops, "p": self.publish},
                          separators=(",", ":"))


class RedisStore:
    def __init__(self, client: aioredis.Redis, *, heartbeat_interval: float = 2.0,
                 lease_timeout: float = 2.0, clock: Callable[[], float] | None = None,
                 prefix: str = "naiad:", rng: random.Random | None = None,
                 restarts: RestartCounter | None = None) -> None:
        self.redis = client
        self.heartbeat_interval = heartbeat_interval
        self.lease_timeout = lease_timeout
        self.ttl_ms = max(1, round(expiry_seconds(heartbeat_interval) * 1000))
        self._clock = clock
        self.p = prefix
        self.rng = rng or random.Random()
        self.id = uuid.uuid4().hex[:12]
        self.channel = f"{prefix}changes"  # broadcasts; a task's changes go to channel:task
        self.waiters = Waiters(self._watch, self._unwatch)
        self.subscribed = asyncio.Event()
        self._pubsub: Any = None  # the listener's, while connected
        self._watched: dict[str, tuple[int, asyncio.Event]] = {}  # task -> (waiters, confirmed)
        self._tasks = TaskSet("redis-store", restarts)
        self._apply = _Batched(client.register_script(APPLY_LUA), self._tasks)
        self._read = _Batched(client.register_script(READ_LUA), self._tasks)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> RedisStore:
        return cls(aioredis.Redis.from_url(url, decode_responses=True), **kw)

    async def start(self) -> None:
        """Start listening for other replicas' changes (in the background: a Redis that is down
        now is retried, and the API answers 5xx until it is back)."""
        self._tasks.supervise("redis-changes", self._listen)

    async def close(self) -> None:
        await self._tasks.close()
        await self.redis.aclose()

    # -- keys ------------------------------------------------------------------------------

    def k_peer(self, pid: str) -> str:
        return f"{self.p}peer:{pid}"

    def k_peer_tasks(self, pid: str) -> str:
        return f"{self.p}peertasks:{pid}"

    def k_task(self, tid: str) -> str:
        return f"{self.p}task:{tid}"

    def k_chunk(self, tid: str) -> str:
        return f"{self.p}chunk:{tid}"

    def k_holders(self, tid: str) -> str:
        return f"{self.p}holders:{tid}"

    def k_held(self, tid: str) -> str:
        return f"{self.p}held:{tid}"

    @property
    def k_peers(self) -> str:  # zset: peer id -> when its hash expires (ms, Redis clock)
        return f"{self.p}peers"

    @property
    def k_tasks(self) -> str:
        return f"{self.p}tasks"

    @property
    def k_cordoned(self) -> str:
        return f"{self.p}cordoned"

    @property
    def k_last(self) -> str:
        return f"{self.p}counters:last"

    @property
    def k_total(self) -> str:
        return f"{self.p}counters:total"

    @property
    def k_back_to_source(self) -> str:
        return f"{self.p}back_to_source"

    # -- wake-ups --------------------------------------------------------------------------

    def task_channel(self, task_id: str) -> str:
        return f"{self.channel}:{task_id}"

    async def _watch(self, task_id: str) -> None:
        """Hear of this task's changes from now on: subscribe to its channel, and return once
        Redis confirmed (or after a second: the periodic re-decision covers a late one)."""
        users, confirmed = self._watched.get(task_id, (0, None))
        if confirmed is None:
            confirmed = asyncio.Event()
            if self._pubsub is not None:
                try:
                    await self._pubsub.subscribe(self.task_channel(task_id))
                except (RedisError, OSError) as e:
                    log.warning("cannot subscribe to changes of %s: %s: %s", task_id,
                                type(e).__name__, e)
            users, _ = self._watched.get(task_id, (0, None))  # others may have come meanwhile
        self._watched[task_id] = (users + 1, confirmed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(confirmed.wait(), 1.0)

    def _unwatch(self, task_id: str) -> None:
        users, confirmed = self._watched.get(task_id, (0, None))
        if users > 1:
            self._watched[task_id] = (users - 1, confirmed)
            return
        self._watched.pop(task_id, None)
        if self._pubsub is not None:
            self._tasks.spawn(self._pubsub.unsubscribe(self.task_channel(task_id)),
                              "redis-unsubscribe")

    async def _listen(self) -> None:
        """One subscriber per replica: the broadcast channel, and the channels of the tasks
        this replica has long polls on (so a replica hears only of what it waits for). Runs
        until the feed is lost (Redis down or restarted): then it raises, and its supervisor
        subscribes again with backoff."""
        prefix = self.channel + ":"
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel, *map(self.task_channel, self._watched))
            self._pubsub = pubsub
            async for msg in pubsub.listen():
                kind, channel = msg["type"], msg["channel"]
                if kind == "subscribe" and channel == self.channel:
                    self.subscribed.set()
                    self.waiters.notify_all()  # changes may have gone unheard till now
                elif kind == "subscribe":
                    watched = self._watched.get(channel.removeprefix(prefix))
                    if watched is not None:
                        watched[1].set()
                elif kind == "message":
                    origin, _, task_id = msg["data"].partition(" ")
                    if origin != self.id:
                        self._wake(task_id)
            raise ConnectionError("the redis change feed ended")
        finally:
            self._pubsub = None
            self.subscribed.clear()
            try:
                await pubsub.aclose()
            except (RedisError, OSError) as e:
                log.debug("closing the change feed: %r", e)

    def _wake(self, task_id: str) -> None:
        if task_id == ALL:
            self.waiters.notify_all()
        else:
            self.waiters.notify(task_id)

    # -- the optimistic loop ---------------------------------------------------------------

    async def _locked(self, key: str | None, call: Callable[[], Awaitable[T]]) -> T:
        """Calls on one task queue here, so only other replicas make a call retry."""
        if key is None:
            return await call()
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                return await call()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _transact(self, plan: Callable[[_Loader], Awaitable[None]],
                        rule: Callable[[_World], T], *, lock: str | None = None,
                        actor: str | None = None, wake: str | None = None) -> T:
        """Load (`plan`), decide (`rule`, one of ClusterState's methods), write back; again
        from the start if another replica changed the task meanwhile."""
        async def attempts() -> T:
            for attempt in range(MAX_ATTEMPTS):
                loader = _Loader(self)
                await plan(loader)
                world = loader.world
                result = rule(world)
                tx = self._diff(world, actor)
                if wake is not None:
                    channel = self.channel if wake == ALL else self.task_channel(wake)
                    tx.publish.append([channel, f"{self.id} {wake}"])
                if not tx or await self._apply(tx.spec()) == 0:
                    if wake is not None:
                        self._wake(wake)
                    return result
                # Lost a race with another replica: back off a little, at random, and redo.
                await asyncio.sleep(self.rng.uniform(0, min(0.05, 0.0005 * 2 ** attempt)))
            raise StoreBusy(f"gave up after {MAX_ATTEMPTS} conflicting attempts")
        return await self._locked(lock, attempts)

    def _diff(self, w: _World, actor: str | None) -> _Tx:
        """The writes that turn what was loaded into what the rule left, with fences on what
        they depend on."""
        tx = _Tx()
        st = w.state
        for pid, before in w.peers.items():
            after = dict.get(st.peers, pid)
            key = self.k_peer(pid)
            if after is None:
                if before is not None or pid in w.ghosts:  # left, or swept after expiry
                    if pid in w.ghosts:
                        tx.fence("absent", key)  # it came back meanwhile: not ours to sweep
                    tx.op("del", key)
                    tx.op("del", self.k_peer_tasks(pid))
                    tx.op("zrem", self.k_peers, pid)
                continue
            if before is None:  # registered
                tx.op("hset", key, *[x for f, v in zip(PEER_FIELDS, _peer_values(after),
                                                        strict=True) for x in (f, _peer_field(v))])
            else:
                for i, (old, new) in enumerate(zip(before, _peer_values(after), strict=True)):
                    if old is not new and old != new:
                        tx.op(_PEER_OPS[i], key, PEER_FIELDS[i], _peer_field(new))
            added = after.tasks - w.peer_tasks.get(pid, frozenset())
            if added:
                tx.op("sadd", self.k_peer_tasks(pid), *sorted(added))
            gone = w.peer_tasks[pid] - after.tasks if pid in w.peer_tasks else ()
            if gone:  # holdings dropped (a new process of the peer)
                tx.op("srem", self.k_peer_tasks(pid), *sorted(gone))
        if actor is not None and dict.get(st.peers, actor) is not None:
            if w.peers.get(actor) is not None:
                tx.fence("exists", self.k_peer(actor))
            tx.touch(self.k_peer(actor), self.ttl_ms, self.k_peers, actor)
        for tid, before in w.tasks.items():
            self._diff_task(tx, tid, before, dict.get(st.tasks, tid))
        for pid, was in w.cordoned.items():
            now = pid in st.cordoned
            if now != was:
                tx.op("sadd" if now else "srem", self.k_cordoned, pid)
        for pid, raw in w.last_counters.items():
            after = dict.get(st.totals.last, pid)
            if after is not None and (raw is None or after.model_dump_json() != raw):
                tx.fence("eq", self.k_last, pid, raw)
                tx.op("hset", self.k_last, pid, after.model_dump_json())
        for k, delta in st.totals.total.items():
            if delta:
                tx.op("hincrby", self.k_total, k, str(delta))
        if st.back_to_source:
            tx.op("incrby", self.k_back_to_source, str(st.back_to_source))
        return tx

    def _diff_task(self, tx: _Tx, tid: str, before: _TaskBase, task: TaskState | None) -> None:
        if task is None:
            return  # rules never delete a task
        key = self.k_task(tid)
        writes: list[str] = []
        leases = encode_leases(task.leases)
        if before.version is None:
            tx.fence("eq", key, "v", None)  # created by one replica only
            tx.op("sadd", self.k_tasks, tid)
            writes += ["meta", task.meta.model_dump_json(), "created_at", _f(task.created_at),
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
        pieces = task.pieces
        cleared = isinstance(pieces, Partial) and pieces.cleared
        if cleared:
            tx.op("del", self.k_chunk(tid))
            tx.op("del", self.k_holders(tid))
        for index in set(before.pieces) | set(dict.keys(pieces)):
            old = None if cleared else before.pieces.get(index)
            piece = dict.get(pieces, index)
            if piece is None:
                if old is not None:
                    chunk_del.append(str(index))
                    holders_del.append(str(index))
                continue
            encoded = encode_piece(piece)
            if old is not None and old[0] == piece.chunk and old[1] == encoded:
                continue
            if piece.chunk is not None:
                chunk_set += [str(index), piece.chunk]
            elif old is not None and old[0] is not None:
                chunk_del.append(str(index))
            holders_set += [str(index), encoded]
        held_set: list[str] = []
        held_del: list[str] = []
        held = task.held
        held_cleared = isinstance(held, Partial) and held.cleared
        if held_cleared:
            tx.op("del", self.k_held(tid))
        for pid in set(before.held) | set(dict.keys(held)):
            old = None if held_cleared else before.held.get(pid)
            count = dict.get(held, pid)
            if count is None:
                if old is not None:
                    held_del.append(pid)
            elif count != old:
                held_set += [pid, str(count)]
        changed = bool(writes or chunk_set or chunk_del or holders_set or holders_del
                       or held_set or held_del or cleared or held_cleared)
        if not changed:
            return
        if before.version is not None:
            tx.fence("eq", key, "v", before.version)
        writes += ["v", str(int(before.version or 0) + 1)]
        tx.op("hset", key, *writes)
        for name, k, args in (("hset", self.k_chunk(tid), chunk_set),
                              ("hdel", self.k_chunk(tid), chunk_del),
                              ("hset", self.k_holders(tid), holders_set),
                              ("hdel", self.k_holders(tid), holders_del),
                              ("hset", self.k_held(tid), held_set),
                              ("hdel", self.k_held(tid), held_del)):
            if args:
                tx.op(name, k, *args)

    # -- peers -----------------------------------------------------------------------------

    async def register(self, reg: PeerRegistration) -> None:
        exists, leftover = json.loads(await self._read(json.dumps(
            [["EXISTS", self.k_peer(reg.id)], ["SCARD", self.k_peer_tasks(reg.id)]])))
        if not exists and leftover:
            await self._sweep(reg.id)  # holdings of its expired session, not swept yet

        async def plan(ld: _Loader) -> None:
            ld.peer(reg.id, tasks=True)
            await ld.run()
            old = dict.get(ld.world.state.peers, reg.id)
            if old is not None and reg.started_at and reg.started_at != old.reg.started_at:
                for tid in old.tasks:  # a new process: the rule drops what the old one held
                    ld.task(tid, pieces=None, held=None)
                await ld.run()
        await self._transact(plan, lambda w: w.state.register(reg, w.now), actor=reg.id)

    async def heartbeat(self, peer_id: str, hb: Heartbeat) -> None:
        async def plan(ld: _Loader) -> None:
            ld.peer(peer_id)
            ld.last_counters(peer_id)
            await ld.run()
        await self._transact(plan, lambda w: w.state.heartbeat(peer_id, hb, w.now),
                             actor=peer_id)

    async def leave(self, peer_id: str) -> None:
        async def plan(ld: _Loader) -> None:
            ld.peer(peer_id, tasks=True)
            await ld.run()
            for tid in ld.world.peer_tasks.get(peer_id, ()):
                ld.task(tid, pieces=None, held=None)
            await ld.run()
        await self._transact(plan, lambda w: w.state.leave(peer_id), wake=ALL)

    async def expire(self) -> list[str]:
        """Sweep the holdings of peers whose hash expired; one replica claims each sweep."""
        (secs, micros), = await self._pipe(lambda p: (p.time(),))
        due = await self.redis.zrangebyscore(self.k_peers, "-inf", secs * 1000 + micros // 1000,
                                             start=0, num=1000)
        if not due:
            return []
        alive = await self._pipe(lambda p: [p.exists(self.k_peer(pid)) for pid in due])
        gone = []
        for pid, exists in zip(due, alive, strict=True):
            if not exists and await self.redis.zrem(self.k_peers, pid):
                await self._sweep(pid)
                gone.append(pid)
        return gone

    async def _sweep(self, peer_id: str) -> None:
        """Drop an expired peer's holdings, unless it came back meanwhile."""
        async def plan(ld: _Loader) -> None:
            ld.ghost(peer_id)
            await ld.run()
            if peer_id in ld.world.ghosts:
                for tid in ld.world.peer_tasks.get(peer_id, ()):
                    ld.task(tid, pieces=None, held=None)
                await ld.run()

        def rule(w: _World) -> None:
            if peer_id in w.ghosts:
                w.state.leave(peer_id)
        await self._transact(plan, rule, wake=ALL)

    async def cordon(self, peer_id: str) -> None:
        await self._transact(self._plan_peer(peer_id), lambda w: w.state.cordon(peer_id))

    async def uncordon(self, peer_id: str) -> None:
        await self._transact(self._plan_peer(peer_id), lambda w: w.state.uncordon(peer_id))

    @staticmethod
    def _plan_peer(peer_id: str) -> Callable[[_Loader], Awaitable[None]]:
        async def plan(ld: _Loader) -> None:
            ld.peer(peer_id)
            await ld.run()
        return plan

    # -- tasks -----------------------------------------------------------------------------

    async def ensure_task(self, req: TaskRequest) -> TaskMeta:
        async def plan(ld: _Loader) -> None:
            ld.task(req.task_id, pieces=(), held=())
            await ld.run()
        return await self._transact(plan, lambda w: w.state.ensure_task(req, w.now),
                                    lock=req.task_id)

    async def announce(self, ann: Announce) -> AnnounceReply:
        claimed = [c.index for c in ann.pieces]

        async def plan(ld: _Loader) -> None:
            ld.peer(ann.peer_id)
            ld.task(ann.task_id, pieces=claimed, held=[ann.peer_id])
            await ld.run()
            task = dict.get(ld.world.state.tasks, ann.task_id)
            if task is None:
                return
            # Whether a claimed piece's lease is live depends on its holder being alive.
            ld.peers(task.leases[i].holder for i in claimed if i in task.leases)
            await ld.run()
        return await self._transact(plan, lambda w: w.state.announce(ann, w.now),
                                    lock=ann.task_id, actor=ann.peer_id,
                                    wake=ann.task_id if ann.pieces or ann.sealed else None)

    async def schedule(self, req: ScheduleRequest) -> list[Decision]:
        return await self.waiters.schedule(req, self._decide)

    async def _decide(self, req: ScheduleRequest) -> list[Decision]:
        wanted = list(dict.fromkeys(req.pieces))

        async def plan(ld: _Loader) -> None:
            ld.peer(req.peer_id)
            ld.task(req.task_id, pieces=wanted, held=(), counted=True)  # cold: any holder?
            await ld.run()
            task = dict.get(ld.world.state.tasks, req.task_id)
            if task is None:
                return
            holders = {h for i in wanted if (p := dict.get(task.pieces, i)) is not None
                       for h in p.holders}
            # Candidates, and every lease holder: a task is cold only without a live lease.
            ld.peers(holders | {le.holder for le in task.leases.values()})
            ld.held(req.task_id, holders)
            await ld.run()
        return await self._transact(plan, lambda w: w.state.schedule(req, w.now),
                                    lock=req.task_id, actor=req.peer_id)

    async def report(self, rep: Report) -> None:
        corrupt_piece = rep.kind == "corrupt" and rep.piece is not None

        async def plan(ld: _Loader) -> None:
            ld.peer(rep.peer_id)
            ld.peer(rep.parent_id)
            if corrupt_piece:
                ld.task(rep.task_id, pieces=[rep.piece], held=[rep.parent_id])
            await ld.run()
        await self._transact(plan, lambda w: w.state.report(rep, w.now),
                             lock=rep.task_id if corrupt_piece else None)

    async def withdraw(self, wd: Withdraw) -> None:
        async def plan(ld: _Loader) -> None:
            ld.peer(wd.peer_id)
            ld.task(wd.task_id, pieces=wd.pieces, held=[wd.peer_id])
            await ld.run()
        await self._transact(plan, lambda w: w.state.withdraw(wd), lock=wd.task_id)

    async def blob_mismatch(self, peer_id: str, task_id: str,
                            registry: str | None = None) -> None:
        async def plan(ld: _Loader) -> None:
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
        return await self._peer_views(sorted(await self.redis.zrange(self.k_peers, 0, -1)))

    async def peer(self, peer_id: str) -> dict | None:
        views = await self._peer_views([peer_id])
        return views[0] if views else None

    async def _peer_views(self, ids: list[str]) -> list[dict]:
        if not ids:
            return []
        ld = _Loader(self)
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
        ids = sorted(await self.redis.smembers(self.k_tasks))
        ld = _Loader(self)
        for tid in ids:
            ld.task(tid, pieces=(), held=None, counted=True)
        await ld.run()
        st = ld.world.state
        return [st.task_view(t, detail=False) for tid in ids
                if (t := dict.get(st.tasks, tid)) is not None]

    async def task(self, task_id: str) -> dict | None:
        ld = _Loader(self)
        ld.task(task_id, pieces=None, held=None)
        await ld.run()
        t = dict.get(ld.world.state.tasks, task_id)
        return None if t is None else ld.world.state.task_view(t, detail=True)

    async def counters(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self.k_total)
        return {k: int(raw.get(k, 0)) for k in Totals().total}

    async def back_to_source(self) -> int:
        return int(await self.redis.get(self.k_back_to_source) or 0)

    # -- plumbing --------------------------------------------------------------------------

    async def _pipe(self, queue: Callable[[Any], Iterable[Any]]) -> list:
        async with self.redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            return await pipe.execute()


class _Reads:
    """Commands for the read script, each with how to shape its JSON reply like redis-py's."""

    def __init__(self) -> None:
        self.cmds: list[list[str]] = []
        self.shapes: list[Callable[[Any], Any]] = []

    def _add(self, shape: Callable[[Any], Any], *cmd: Any) -> None:
        self.cmds.append([str(x) for x in cmd])
        self.shapes.append(shape)

    def hmget(self, key: str, *fields: Any) -> None:
        self._add(_values, "HMGET", key, *fields)

    def hgetall(self, key: str) -> None:
        self._add(_pairs, "HGETALL", key)

    def hget(self, key: str, fld: str) -> None:
        self._add(_value, "HGET", key, fld)

    def hlen(self, key: str) -> None:
        self._add(int, "HLEN", key)

    def scard(self, key: str) -> None:
        self._add(int, "SCARD", key)

    def smembers(self, key: str) -> None:
        self._add(_values, "SMEMBERS", key)

    def smismember(self, key: str, members: list[str]) -> None:
        self._add(_values, "SMISMEMBER", key, *members)

    def time(self) -> None:
        self._add(lambda r: (int(r[0]), int(r[1])), "TIME")

    def shape(self, replies: list) -> list:
        return [f(r) for f, r in zip(self.shapes, replies, strict=True)]


def _value(r: Any) -> Any:
    return None if r is False else r


def _values(r: Any) -> list:
    return [] if r == {} else [None if x is False else x for x in r]  # cjson: {} for empty


def _pairs(r: Any) -> dict:
    return {} if r == {} else dict(zip(r[::2], r[1::2], strict=True))


class _Loader:
    """Builds a `_World` in rounds: queue what to read, `run()` it in one round trip (the read
    script: each round is one atomic snapshot), queue what that revealed. A later round may
    read newer state than an earlier one; the version fence at write time catches that."""

    def __init__(self, store: RedisStore) -> None:
        self.s = store
        st = ClusterState(heartbeat_interval=store.heartbeat_interval,
                          lease_timeout=store.lease_timeout, rng=store.rng)
        st.peers = Partial({}, ())
        st.tasks = Partial({}, ())
        st.totals.last = Partial({}, ())
        self.world = _World(st)
        self._queued: list[tuple[Callable[[Any], None], int, Callable[[list], None]]] = []
        self._peer_ids: list[str] = []  # queued this round; parsed with their cordon flags
        self._peer_values: dict[str, list] = {}
        self._asked: set[str] = set()
        self._ghosts: set[str] = set()
        self._rounds = 0

    def _queue(self, add: Callable[[Any], None], replies: int,
               parse: Callable[[list], None]) -> None:
        self._queued.append((add, replies, parse))

    def peer(self, pid: str, tasks: bool = False) -> None:
        """A peer's record (absent when expired), its cordon flag, and with `tasks` the set
        of tasks it announced."""
        if pid in self._asked:
            return
        self._asked.add(pid)
        self._peer_ids.append(pid)
        k_peer, k_tasks = self.s.k_peer(pid), self.s.k_peer_tasks(pid)

        def add(p: Any) -> None:
            p.hmget(k_peer, *PEER_FIELDS)
            if tasks:
                p.smembers(k_tasks)

        def parse(replies: list) -> None:
            self._peer_values[pid] = replies[0]
            if tasks:
                self.world.peer_tasks[pid] = frozenset(replies[1])
        self._queue(add, 2 if tasks else 1, parse)

    def peers(self, ids: Iterable[str]) -> None:
        for pid in ids:
            self.peer(pid)

    def ghost(self, pid: str) -> None:
        """A peer to sweep, with the tasks it announced, if its record is indeed gone."""
        self._ghosts.add(pid)
        self.peer(pid, tasks=True)

    def task_counts(self, ids: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}

        def parse(replies: list) -> None:
            counts.update(zip(ids, replies, strict=True))
        self._queue(lambda p: [p.scard(self.s.k_peer_tasks(pid)) for pid in ids], len(ids),
                    parse)
        return counts

    def last_counters(self, pid: str) -> None:
        def parse(replies: list) -> None:
            raw = replies[0]
            self.world.last_counters[pid] = raw
            self.world.state.totals.last.extend({} if raw is None else {pid: _counters(raw)},
                                                [pid])
        self._queue(lambda p: p.hget(self.s.k_last, pid), 1, parse)

    def task(self, tid: str, pieces: Iterable[int] | None, held: Iterable[str] | None,
             counted: bool = False) -> None:
        """A task with the given pieces and peers' held counts (None: all of them); `counted`:
        with the sizes of the maps loaded in part."""
        s = self.s
        pieces = None if pieces is None else list(dict.fromkeys(pieces))
        held = None if held is None else list(dict.fromkeys(held))

        def add(p: Any) -> None:
            p.hmget(s.k_task(tid), *TASK_FIELDS)
            if pieces is None:
                p.hgetall(s.k_chunk(tid))
                p.hgetall(s.k_holders(tid))
            else:
                if counted:
                    p.hlen(s.k_holders(tid))
                if pieces:
                    p.hmget(s.k_chunk(tid), *pieces)
                    p.hmget(s.k_holders(tid), *pieces)
            if held is None:
                p.hgetall(s.k_held(tid))
            else:
                if counted:
                    p.hlen(s.k_held(tid))
                if held:
                    p.hmget(s.k_held(tid), *held)

        replies = 1 + (2 if pieces is None else counted + (2 if pieces else 0)) + \
            (1 if held is None else counted + (1 if held else 0))

        def parse(replies: list) -> None:
            meta_raw, created_at, next_epoch, version, leases_raw, trust_raw = replies[0]
            tasks = self.world.state.tasks
            if meta_raw is None:
                tasks.extend({}, [tid])
                self.world.tasks[tid] = _TaskBase(version=None)
                return
            base = _TaskBase(version=version, meta=_meta(meta_raw),
                             next_epoch=int(next_epoch), leases=leases_raw or "",
                             trust=_trust(trust_raw) if trust_raw else TaskTrust())
            r = iter(replies[1:])
            piece_map = Partial({}, pieces)
            if pieces is None:
                chunks, holder_map = next(r), next(r)
                rows = ((int(i), chunks.get(i), raw) for i, raw in holder_map.items())
            else:
                total = next(r) if counted else None
                rows = zip(pieces, next(r), next(r), strict=True) if pieces else ()
            for i, chunk, raw in rows:
                if raw is None:  # a piece exists while it has a holders field
                    base.pieces[i] = None
                    continue
                dict.__setitem__(piece_map, i, decode_piece(chunk, raw))
                base.pieces[i] = (chunk, raw)
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
            task = TaskState(meta=base.meta, created_at=float(created_at), pieces=piece_map,
                             leases=decode_leases(leases_raw), held=held_map,
                             next_epoch=base.next_epoch, trust=base.trust)
            tasks.extend({tid: task}, [tid])
            self.world.tasks[tid] = base

        self._queue(add, replies, parse)

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
        self._queue(lambda p: p.hmget(self.s.k_held(tid), *want), 1, parse)

    async def run(self) -> None:
        if not self._queued and self._rounds:
            return
        queued, self._queued = self._queued, []
        peer_ids, self._peer_ids = self._peer_ids, []
        first = self._rounds == 0
        server_time = first and self.s._clock is None
        reads = _Reads()
        if server_time:
            reads.time()
        for add, _, _ in queued:
            add(reads)
        if peer_ids:
            reads.smismember(self.s.k_cordoned, peer_ids)
        raw = json.loads(await self.s._read(json.dumps(reads.cmds, separators=(",", ":"))))
        replies = iter(reads.shape(raw or []))  # cjson: {} for an empty list
        if server_time:
            secs, micros = next(replies)
            self.world.now = secs + micros / 1e6
        elif first:
            self.world.now = self.s._clock()
        self._rounds += 1
        for _, n, parse in queued:
            parse([next(replies) for _ in range(n)])
        if peer_ids:
            self._add_peers(peer_ids, [bool(x) for x in next(replies)])

    def _add_peers(self, ids: list[str], cordoned: list[bool]) -> None:
        w, found = self.world, {}
        for pid, flag in zip(ids, cordoned, strict=True):
            w.cordoned[pid] = flag
            if flag:
                w.state.cordoned.add(pid)
            peer = _peer_from(self._peer_values.pop(pid), flag)
            if peer is not None:
                if pid in w.peer_tasks:
                    peer.tasks = set(w.peer_tasks[pid])
                w.peers[pid] = _peer_values(peer)
                found[pid] = peer
                continue
            w.peers[pid] = None
            if pid in self._ghosts:  # expired: a stand-in to drop its holdings with
                w.ghosts.add(pid)
                found[pid] = PeerState(reg=PeerRegistration.model_construct(id=pid),
                                       registered_at=0.0, last_seen=0.0,
                                       tasks=set(w.peer_tasks.get(pid, ())))
            else:
                w.peer_tasks.pop(pid, None)
        w.state.peers.extend(found, ids)
