"""The history ring in Redis, so every scheduler replica shows the same series.

Each replica's sampler calls `sample()` once per slot: it reads the shared totals (what
`/api/v1/stats` reports: the store's counter shards, summed), then one Lua script on the
history key's slot takes Redis's clock, checks the slot against the newest sample and appends,
capped. Two replicas waking in the same slot therefore store one sample, never two, and samples
stay in time order whoever takes them. The totals are read a moment before the script, so a
replica's read may be older than the newest sample's: the script keeps each figure at least the
newest sample's (totals never go backwards), so the series never does either. One key, so the
same script runs on one Redis and on a Redis Cluster. A sample is
`[t_ms, origin, peer, local, served]`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from scheduler.history import CAPACITY, INTERVAL, Sample
from scheduler.redis_store import RedisStore

# KEYS: the history list. ARGV: interval in ms, capacity, then the totals origin, peer, local,
# served. The slot rule is scheduler/history.py's `slot`, in milliseconds.
SAMPLE_LUA = """
local now = redis.call('TIME')
local t_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval_ms = tonumber(ARGV[1])
local c = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local newest = redis.call('LINDEX', KEYS[1], -1)
if newest then
  local last = cjson.decode(newest)
  if math.floor(last[1] / interval_ms) >= math.floor(t_ms / interval_ms) then
    return 0
  end
  for i = 1, 4 do c[i] = math.max(c[i], last[i + 1]) end
end
for i = 1, 4 do c[i] = string.format('%d', c[i]) end
redis.call('RPUSH', KEYS[1], '[' .. string.format('%d', t_ms) .. ',' .. table.concat(c, ',') .. ']')
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
return 1
"""


class RedisHistory:
    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, *, key: str,
                 totals: Callable[[], Awaitable[dict[str, int]]],
                 interval: float = INTERVAL, capacity: int = CAPACITY) -> None:
        if interval <= 0 or capacity < 2:
            raise ValueError("a history needs an interval > 0 and room for two samples")
        self.interval = interval
        self.capacity = capacity
        self.redis = client
        self.key = key
        self.totals = totals
        self._sample = client.register_script(SAMPLE_LUA)

    @classmethod
    def of(cls, store: RedisStore, **kw: Any) -> RedisHistory:
        """Beside the store's state: its client, its key prefix, its totals."""
        return cls(store.redis, key=store.keys.history, totals=store.counters, **kw)

    async def sample(self) -> bool:
        c = await self.totals()
        return bool(await self._sample(keys=[self.key], args=[
            max(1, round(self.interval * 1000)), self.capacity,
            c["origin"], c["peer"], c["local"], c["served"]]))

    async def samples(self) -> list[Sample]:
        return [_decode(raw) for raw in await self.redis.lrange(self.key, 0, -1)]


def _decode(raw: str | bytes) -> Sample:
    t_ms, origin, peer, local, served = json.loads(raw)
    return Sample(t_ms / 1000, int(origin), int(peer), int(local), int(served))
