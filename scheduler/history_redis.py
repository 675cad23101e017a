"""The history ring in Redis, so every scheduler replica shows the same series.

Each replica's sampler calls `sample()` once per slot; one Lua script takes the whole sample
inside Redis: Redis's clock, the shared totals (`counters:total`, the hash `/api/v1/stats`
reads), the slot check against the newest sample and the capped append. Two replicas waking in
the same slot therefore store one sample, never two, and samples stay in time order whoever
takes them. A sample is `[t_ms, origin, peer, local, served]`.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from scheduler.history import CAPACITY, INTERVAL, Sample
from scheduler.redis_store import RedisStore

# KEYS: the history list, the totals hash. ARGV: interval in ms, capacity. The slot rule is
# scheduler/history.py's `slot`, in milliseconds.
SAMPLE_LUA = """
local now = redis.call('TIME')
local t_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval_ms = tonumber(ARGV[1])
local newest = redis.call('LINDEX', KEYS[1], -1)
if newest then
  local newest_ms = tonumber(string.match(newest, '^%[(%d+)'))
  if newest_ms and math.floor(newest_ms / interval_ms) >= math.floor(t_ms / interval_ms) then
    return 0
  end
end
local c = redis.call('HMGET', KEYS[2], 'origin', 'peer', 'local', 'served')
for i = 1, 4 do c[i] = c[i] or '0' end
redis.call('RPUSH', KEYS[1], '[' .. string.format('%d', t_ms) .. ',' .. table.concat(c, ',') .. ']')
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
return 1
"""


class RedisHistory:
    def __init__(self, client: aioredis.Redis, *, key: str, totals: str,
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
        return cls(store.redis, key=f"{store.p}history", totals=store.k_total, **kw)

    async def sample(self) -> bool:
        return bool(await self._sample(keys=[self.key, self.totals],
                                       args=[max(1, round(self.interval * 1000)), self.capacity]))

    async def samples(self) -> list[Sample]:
        return [_decode(raw) for raw in await self.redis.lrange(self.key, 0, -1)]


def _decode(raw: str | bytes) -> Sample:
    t_ms, origin, peer, local, served = json.loads(raw)
    return Sample(t_ms / 1000, int(origin), int(peer), int(local), int(served))
