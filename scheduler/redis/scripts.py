"""The Lua the store runs, and `Batched`: calls made in the same turn of the event loop share
one script run per slot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from common.tasks import TaskSet
from scheduler.redis.keys import GroupOf

# Writes, fenced. Each ARGV is one part of one call's writes, all in one slot, JSON:
# {"k": [keys], "f": [[kind, key#, field, expected]...], "o": [[op, key#, args...]...],
#  "p": [[channel, message]...]}. A fence is 'eq' (a hash field equals `expected`; false:
# absent), 'exists' or 'absent'; a part's fences are all checked before any of its writes, so
# it applies whole or not at all. Returns, per part, 0 when applied, else the 1-based number of
# the fence that failed. 'happend' adds ids to a piece's holders field (`a,b`, and an earlier
# layout's children after a `|`) without the replica sending the whole field. Keys are named
# in ARGV (KEYS[1] only routes the run to its node), so that concurrent calls on one node
# share one run: on a cluster the scripts run with
# `CROSS_SLOT`, each part still in one slot. PUBLISH, not SPUBLISH: a cluster passes it to
# every node, so a replica's one subscriber hears every slot's changes.
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
      elseif op == 'happend' then
        for i = 3, #o, 2 do
          local v = redis.call('HGET', key, o[i])
          if not v or v == '' then
            v = o[i + 1]
          else
            local bar = string.find(v, '|', 1, true)
            if bar == 1 then
              v = o[i + 1] .. v
            elseif bar then
              v = string.sub(v, 1, bar - 1) .. ',' .. o[i + 1] .. string.sub(v, bar)
            else
              v = v .. ',' .. o[i + 1]
            end
          end
          redis.call('HSET', key, o[i], v)
        end
      elseif op == 'hdel' then
        redis.call('HDEL', key, unpack(o, 3))
      elseif op == 'hincrby' then
        redis.call('HINCRBY', key, o[3], o[4])
      elseif op == 'sadd' then
        redis.call('SADD', key, unpack(o, 3))
      elseif op == 'srem' then
        redis.call('SREM', key, unpack(o, 3))
      elseif op == 'set' then
        redis.call('SET', key, o[3])
      elseif op == 'del' then
        redis.call('DEL', key)
      elseif op == 'zrem' then
        redis.call('ZREM', key, o[3])
      elseif op == 'pexpire' then
        redis.call('PEXPIRE', key, o[3])
      elseif op == 'zaddttl' then
        if not now_ms then
          local t = redis.call('TIME')
          now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        end
        redis.call('ZADD', key, 'GT', now_ms + tonumber(o[3]), o[4])
      end
    end
    for _, p in ipairs(spec.p) do redis.call('PUBLISH', p[1], p[2]) end
  end
  results[j] = failed
end
return results
"""
# Reads. Each ARGV is one call's read commands on one node (JSON: [[command, args...]...]), run
# atomically, so a task is read as one snapshot; each call's replies come back as one JSON
# document: one bulk string to parse rather than one per field, which is most of a pure-Python
# client's cost.
#
# One command of its own, `HOLDERS task holders hseq created_at field seq field seq...`: pieces'
# holders fields, except those the replica has decoded already. A field's `hseq` is the task
# version at which a replica of this layout last wrote it; it is trusted only while every write
# to the task since came from this layout (the task's `nv`, the version the last such write
# left, equals its `v`; an earlier layout's write leaves them apart until this layout's next
# write drops every `hseq`); a `seq` sent is compared only on the task it was read from
# (`created_at`). Per field, two replies: the field (0: unchanged since the `seq` sent), and
# its `hseq` while trusted (false: none, or not trusted).
READ_LUA = """
local function holders(c)
  local t = redis.call('HMGET', c[2], 'v', 'nv', 'created_at')
  local fields = {}
  for i = 6, #c, 2 do fields[#fields + 1] = c[i] end
  local seqs, same = {}, t[3] == c[5]
  if t[1] and t[1] == t[2] then seqs = redis.call('HMGET', c[4], unpack(fields)) end
  local out, want, at = {}, {}, {}
  for n, f in ipairs(fields) do
    local s = seqs[n] or false
    out[2 * n] = s
    if s and same and s == c[5 + 2 * n] then
      out[2 * n - 1] = 0
    else
      want[#want + 1] = f
      at[#at + 1] = 2 * n - 1
    end
  end
  if #want > 0 then
    local raw = redis.call('HMGET', c[3], unpack(want))
    for k, pos in ipairs(at) do out[pos] = raw[k] end
  end
  return out
end
local outs = {}
for j = 1, #ARGV do
  local out = {}
  for i, c in ipairs(cjson.decode(ARGV[j])) do
    if c[1] == 'HOLDERS' then out[i] = holders(c) else out[i] = redis.call(unpack(c)) end
  end
  outs[j] = cjson.encode(out)
end
return outs
"""
# The peers of one index shard whose records are due to expire by that shard's clock.
DUE_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
"""
# On a cluster: a run may touch keys of several slots of its node (Redis 7), so one run serves
# every call on that node; a key another node serves fails the run (the client's map of slots
# is refreshed then).
CROSS_SLOT = "#!lua flags=allow-cross-slot-keys\n"
NOT_LOCAL = "non local key"  # the error of a run sent on a stale map of slots
ARGS_PER_OP = 2000  # Lua's unpack() is limited to a few thousand values


def closed() -> RedisConnectionError:
    """What a call on a closed store gets: unavailable, as when Redis is down (a 503)."""
    return RedisConnectionError("the redis store is closed")


def spawn_or_fail(tasks: TaskSet, coro: Coroutine[Any, Any, Any], name: str,
                  fail: Callable[[BaseException], None]) -> None:
    """`coro` on the store's tasks, or, once the store closed, `fail(closed())`: the callers
    waiting on what it would have done get an answer."""
    try:
        tasks.spawn(coro, name)
    except RuntimeError:
        fail(closed())


def _fail(batch: list[tuple[str, asyncio.Future]], e: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(e)


class Batched:
    """Calls of one script made in the same turn of the event loop, sent as one script run per
    group (`group_of` their routing key: everything on one Redis, a node on a cluster): a
    replica serving many peers pays one round trip, and one client-side command, for many
    calls. Each call is one ARGV; the script answers a list, one reply per call."""

    LIMIT = 64  # calls per run: bounds how long one run holds Redis

    def __init__(self, script: Any, tasks: TaskSet, group_of: GroupOf,
                 stale: Callable[[], Awaitable[None]] | None = None) -> None:
        self.script = script
        self.tasks = tasks
        self.group_of = group_of
        self.stale = stale  # refreshes the map of slots after a NOT_LOCAL failure
        self._pending: dict[Hashable, tuple[str, list[tuple[str, asyncio.Future]]]] = {}

    async def __call__(self, key: str, arg: str) -> Any:
        """Run `arg` on the node of `key`'s slot (with other calls on that node)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        slot = self.group_of(key)
        if not self._pending:
            loop.call_soon(self._flush)
        route, batch = self._pending.setdefault(slot, (key, []))
        batch.append((arg, fut))
        if len(batch) >= self.LIMIT:
            del self._pending[slot]
            self._spawn(route, batch)
        return await fut

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for route, batch in pending.values():
            self._spawn(route, batch)

    def _spawn(self, route: str, batch: list[tuple[str, asyncio.Future]]) -> None:
        spawn_or_fail(self.tasks, self._send(route, batch), "redis-script",
                      lambda e: _fail(batch, e))

    async def _send(self, route: str, batch: list[tuple[str, asyncio.Future]]) -> None:
        try:
            replies = await self.script(keys=[route], args=[arg for arg, _ in batch])
        except Exception as e:  # handed to every caller, who raises it
            if self.stale is not None and NOT_LOCAL in str(e):
                spawn_or_fail(self.tasks, self.stale(), "redis-slots", lambda _: None)
            _fail(batch, e)
            return
        except BaseException:
            for _, fut in batch:
                fut.cancel()
            raise
        for (_, fut), reply in zip(batch, replies, strict=True):
            if not fut.done():
                fut.set_result(reply)
