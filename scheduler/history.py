"""A bounded history of the cluster's byte totals, for the console's charts.

Every `interval` seconds the scheduler keeps one sample of the cumulative totals `/api/v1/stats`
reports (bytes obtained from the origin, from peers and from local stores, and bytes served to
clients), at most `capacity` of them: an hour at the defaults. This module is the pure part:
the samples, the slot rule that keeps at most one sample per interval (so that replicas sampling
one Redis never double-sample), rates per second between samples, the saving over a window and
the body of `GET /api/v1/history`. `MemoryHistory` keeps the ring in this process;
scheduler/history_redis.py keeps it in Redis, shared by every replica.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

SOURCES = ("origin", "peer", "local")
INTERVAL = 5.0  # seconds between samples by default: 2.5 heartbeat intervals of 2 s
HEARTBEATS_PER_SAMPLE = 2.5  # a sample spans two or three reports of every peer
CAPACITY = 720  # samples kept: an hour at 5 s
SAVING_WINDOW = 60.0  # the saving at a sample is over the minute before it
WAKE_OFFSET = 0.05  # wake this far (a fraction of the interval) into a slot, not at its edge


@dataclass(frozen=True, slots=True)
class Sample:
    """The cluster's cumulative counters at `t` (Unix time, seconds: replicas and browsers agree
    on it, where a monotonic clock is per process)."""

    t: float
    origin: int
    peer: int
    local: int
    served: int

    @classmethod
    def of(cls, t: float, counters: Mapping[str, int]) -> Sample:
        return cls(t, *(int(counters.get(k, 0)) for k in (*SOURCES, "served")))


def slot(t: float, interval: float) -> int:
    """The interval `t` falls in: a history keeps one sample per slot."""
    return math.floor(t / interval)


def next_wake(now: float, interval: float) -> float:
    """Seconds until just after the next slot starts. Replicas wake together and the first
    one's sample counts, so samples stay about `interval` apart whoever takes them."""
    return (slot(now, interval) + 1 + WAKE_OFFSET) * interval - now


class Ring:
    """At most `capacity` samples, oldest first, at most one per slot, in time order."""

    def __init__(self, interval: float, capacity: int) -> None:
        if interval <= 0 or capacity < 2:
            raise ValueError("a history needs an interval > 0 and room for two samples")
        self.interval = interval
        self._samples: deque[Sample] = deque(maxlen=capacity)

    def add(self, sample: Sample) -> bool:
        """Keep `sample` unless its slot (or a later one: a clock stepped back) has one."""
        if self._samples and slot(sample.t, self.interval) <= slot(self._samples[-1].t,
                                                                  self.interval):
            return False
        self._samples.append(sample)
        return True

    def samples(self) -> list[Sample]:
        return list(self._samples)


def grown(old: int, new: int) -> int:
    """What a counter added between two samples. Totals never go backwards, except when the
    store lost them (Redis restarted empty): then they count again from zero."""
    return new - old if new >= old else new


def rates(samples: Sequence[Sample]) -> dict[str, list[float | None]]:
    """Bytes per second by source over the interval ending at each sample (None for the first:
    it ends no interval)."""
    out: dict[str, list[float | None]] = {k: [None] * min(1, len(samples)) for k in SOURCES}
    for a, b in itertools.pairwise(samples):
        dt = b.t - a.t
        for k in SOURCES:
            out[k].append(round(grown(getattr(a, k), getattr(b, k)) / dt, 1) if dt > 0 else 0.0)
    return out


def _added(samples: Sequence[Sample], k: str) -> list[int]:
    """Counter `k` as bytes added since the first sample, interval by interval (a counter
    that reset adds what it counted since, never negative bytes)."""
    out = [0] * min(1, len(samples))
    for a, b in itertools.pairwise(samples):
        out.append(out[-1] + grown(getattr(a, k), getattr(b, k)))
    return out


def _saving(origin: int, served: int) -> float | None:
    return round(1.0 - origin / served, 4) if served > 0 else None


def saving(samples: Sequence[Sample]) -> float | None:
    """1 - origin bytes / bytes served between the first and the last of `samples`; None
    when nothing was served in between."""
    if len(samples) < 2:
        return None
    return _saving(_added(samples, "origin")[-1], _added(samples, "served")[-1])


def savings(samples: Sequence[Sample], window: float) -> list[float | None]:
    """At each sample, the saving over the `window` seconds before it: from the latest sample
    at least `window` older (or the first one, while the history is shorter)."""
    ts = [s.t for s in samples]
    origin, served = _added(samples, "origin"), _added(samples, "served")
    out: list[float | None] = []
    for i, s in enumerate(samples):
        base = max(0, bisect.bisect_right(ts, s.t - window) - 1)
        out.append(_saving(origin[i] - origin[base], served[i] - served[base])
                   if base < i else None)
    return out


def view(samples: Sequence[Sample], interval: float, capacity: int,
         window: float = SAVING_WINDOW) -> dict:
    """The body of `GET /api/v1/history`: one column per figure, index i for sample i."""
    return {
        "interval": interval, "capacity": capacity, "window": window,
        "t": [round(s.t, 3) for s in samples],
        "bytes": {k: [getattr(s, k) for s in samples] for k in SOURCES},
        "served_bytes": [s.served for s in samples],
        "rates": rates(samples),
        "saving": savings(samples, window),
        "saving_ratio": saving(samples),
    }


class HistoryLog(Protocol):
    """Where the samples live: this process (`MemoryHistory`) or Redis (`RedisHistory`)."""

    interval: float
    capacity: int

    async def sample(self) -> bool:
        """Take a sample now unless this slot has one; whether this call took it."""
        ...

    async def samples(self) -> list[Sample]: ...


class MemoryHistory:
    """The ring in this process, sampled from the store's totals."""

    def __init__(self, counters: Callable[[], Awaitable[Mapping[str, int]]],
                 interval: float = INTERVAL, capacity: int = CAPACITY,
                 clock: Callable[[], float] = time.time) -> None:
        self.interval = interval
        self.capacity = capacity
        self._counters = counters
        self._clock = clock
        self._ring = Ring(interval, capacity)

    async def sample(self) -> bool:
        counters = await self._counters()
        return self._ring.add(Sample.of(self._clock(), counters))

    async def samples(self) -> list[Sample]:
        return self._ring.samples()
