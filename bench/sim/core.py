"""The simulation's clock and network: an event heap in simulated seconds, and links whose
capacity concurrent flows share max-min fairly.

A flow crosses a tuple of links (its sender's uplink, its receiver's downlink, and the IDC
links between them). When a flow starts or ends, only the flows sharing one of its links are
re-rated, by progressive filling over the capacity those flows' links have left once every
other flow keeps its rate: never more than a link carries, and cheap, since a change touches a
few dozen flows, not the whole swarm. A flow whose rate changed gets a new finish event (older
ones are dropped by a version check when they come up).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EPSILON = 1e-9


class Clock:
    """The event heap: `at(t, fn, *args)` runs fn(*args) at simulated time t, in time order
    and, at equal times, in the order scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        self._seq = 0
        self.events = 0

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn, args))

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        heap = self._heap
        while heap:
            t, _, fn, args = heapq.heappop(heap)
            if t > until:
                heapq.heappush(heap, (t, 0, fn, args))
                return
            self.now = t
            self.events += 1
            fn(*args)
            if stop is not None and stop():
                return


@dataclass(eq=False, slots=True)
class Link:
    name: str
    capacity: float  # bytes/s
    flows: dict[Flow, None] = field(default_factory=dict)  # ordered: runs are reproducible
    alloc: float = 0.0  # sum of its flows' rates
    carried: float = 0.0  # bytes that crossed it


@dataclass(eq=False, slots=True)
class Flow:
    links: tuple[Link, ...]
    remaining: float
    done: Callable[[], None]
    rate: float = 0.0
    since: float = 0.0  # when `remaining` was last brought up to date
    version: int = 0
    alive: bool = True


class Network:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rerates = 0

    def start(self, links: tuple[Link, ...], size: float, done: Callable[[], None]) -> Flow:
        flow = Flow(links, float(size), done, since=self.clock.now)
        for link in links:
            link.flows[flow] = None
        self._rerate(links, flow)
        return flow

    def cancel(self, flow: Flow) -> None:
        """Stop a flow (its sender or receiver died): its bytes so far stay counted."""
        if flow.alive:
            self._settle(flow)
            self._remove(flow)

    def _remove(self, flow: Flow) -> None:
        flow.alive = False
        for link in flow.links:
            link.flows.pop(flow, None)
            link.alloc -= flow.rate
        flow.rate = 0.0
        self._rerate(flow.links, None)

    def _settle(self, flow: Flow) -> None:
        now = self.clock.now
        moved = flow.rate * (now - flow.since)
        if moved:
            flow.remaining -= moved
            for link in flow.links:
                link.carried += moved
        flow.since = now

    def _finished(self, flow: Flow, version: int) -> None:
        if not flow.alive or flow.version != version:
            return
        self._settle(flow)
        flow.remaining = 0.0
        self._remove(flow)
        flow.done()

    def _rerate(self, links: tuple[Link, ...], new: Flow | None) -> None:
        """Progressive filling over the flows on `links`, within what their links have left."""
        self.rerates += 1
        flows: dict[Flow, None] = {}
        for link in links:
            flows.update(link.flows)
        if not flows:
            return
        left: dict[Link, float] = {}
        count: dict[Link, int] = {}
        for f in flows:
            for link in f.links:
                if link in left:
                    left[link] += f.rate
                    count[link] += 1
                else:
                    left[link] = link.capacity - link.alloc + f.rate
                    count[link] = 1
        rates: dict[Flow, float] = {}
        while len(rates) < len(flows):
            best, share = None, 0.0
            for link, n in count.items():
                if n:
                    s = left[link] / n
                    if best is None or s < share:
                        best, share = link, s
            assert best is not None
            share = max(share, 0.0)
            for f in best.flows:
                if f in flows and f not in rates:
                    rates[f] = share
                    for link in f.links:
                        left[link] -= share
                        count[link] -= 1
        clock = self.clock
        for f, rate in rates.items():
            if f is not new and abs(rate - f.rate) <= EPSILON * max(1.0, rate):
                continue
            self._settle(f)
            for link in f.links:
                link.alloc += rate - f.rate
            f.rate = rate
            f.version += 1
            if rate > 0:
                clock.at(clock.now + max(f.remaining, 0.0) / rate, self._finished, f, f.version)
