"""The simulation's clock and network: an event heap in simulated seconds, and links whose
capacity concurrent flows share max-min fairly.

A flow crosses a tuple of links (its sender's uplink, its receiver's downlink, and the IDC
links between them). When a flow starts or ends, only the flows sharing one of its links are
re-rated, by progressive filling over the capacity those flows' links have left once every
other flow keeps its rate: never more than a link carries, and cheap, since a change touches a
few dozen flows, not the whole swarm.

What keeps the simulator fast without changing a run (the same seed gives the same figures,
to the bit, as the plain heap did): every event has a key (time, sequence number) and runs in
key order. An event for the current instant (`after(0)`, the batcher's flush, a woken long
poll) goes in a FIFO rather than the heap, and is merged with the heap by its key. A flow whose
rate changes gets a new finish key, but it is pushed only when it is earlier than the finish
event the flow already has queued; a queued event that comes up before the flow's finish pushes
the finish key then (a flow slowed by a newcomer, most re-ratings, costs no heap entry).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EPSILON = 1e-9
STOP_EVERY = 4096  # Clock.run asks its `stop` after this many events (a power of two)


class Clock:
    """The event queue: `at(t, fn, *args)` runs fn(*args) at simulated time t, in time order
    and, at equal times, in the order scheduled."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., Any], tuple]] = []
        # Events at `now`, in the order scheduled: each key is later than any heap entry's
        # pushed before the clock got here, not than one pushed with a key reserved earlier.
        self._instant: deque[tuple[int, Callable[..., Any], tuple]] = deque()
        self._seq = 0
        self.events = 0  # every event run, a flow's early finish event included
        self.halted = False  # set by an event: `run` returns once it has run

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        self._seq += 1
        if t <= self.now:
            self._instant.append((self._seq, fn, args))
        else:
            heapq.heappush(self._heap, (t, self._seq, fn, args))

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self._seq += 1  # `at(now + dt)`, inlined: most events are scheduled this way
        if dt <= 0.0:
            self._instant.append((self._seq, fn, args))
        else:
            heapq.heappush(self._heap, (self.now + dt, self._seq, fn, args))

    def reserve(self) -> int:
        """A sequence number for an event that may be pushed later (`push`) with this key."""
        self._seq += 1
        return self._seq

    def push(self, t: float, seq: int, fn: Callable[..., Any], *args: Any) -> None:
        """An event with a key reserved earlier; t >= now."""
        heapq.heappush(self._heap, (t, seq, fn, args))

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        """Run the events due by `until`, in key order. It returns early after an event that
        set `halted`, or when `stop()`, asked every STOP_EVERY events, says so (one Python
        call an event, to read a flag, was ~1 % of a big run)."""
        heap, instant = self._heap, self._instant
        pop, popleft = heapq.heappop, instant.popleft
        events = self.events
        mask = STOP_EVERY - 1
        try:
            while True:
                if instant:
                    if heap and heap[0][0] <= self.now and heap[0][1] < instant[0][0]:
                        _, _, fn, args = pop(heap)
                    else:
                        _, fn, args = popleft()
                elif heap:
                    if heap[0][0] > until:
                        return
                    t, _, fn, args = pop(heap)
                    self.now = t
                else:
                    return
                events += 1
                fn(*args)
                if self.halted:
                    return
                if stop is not None and not events & mask:
                    self.events = events
                    if stop():
                        return
        finally:
            self.events = events


@dataclass(eq=False, slots=True)
class Link:
    name: str
    capacity: float  # bytes/s
    flows: dict[Flow, None] = field(default_factory=dict)  # ordered: runs are reproducible
    alloc: float = 0.0  # sum of its flows' rates
    carried: float = 0.0  # bytes that crossed it
    # Network._rerate's working state: valid while `gen` is the re-rating's.
    gen: int = 0
    left: float = 0.0
    n: int = 0


@dataclass(eq=False, slots=True)
class Flow:
    links: tuple[Link, ...]
    remaining: float
    done: Callable[[], None]
    rate: float = 0.0
    since: float = 0.0  # when `remaining` was last brought up to date
    alive: bool = True
    # Its finish: the key (due_at, due) it ends at (due 0: none, its rate is 0), and the key
    # of the earliest event queued for it (queued 0: none). A queued event that is not the
    # finish pushes the finish when it comes up; later ones find their key stale.
    due_at: float = 0.0
    due: int = 0
    queued_at: float = 0.0
    queued: int = 0
    mark: int = 0  # Network._rerate: unrated in the re-rating of this generation


class Network:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rerates = 0
        self._gen = 0  # re-ratings so far, the generation of Link.gen and Flow.mark

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

    def _due(self, flow: Flow, seq: int) -> None:
        if not flow.alive or seq != flow.queued:
            return  # over, or a later event than the one queued first
        if seq != flow.due:  # it came up before the flow's finish: queue that
            flow.queued = flow.due
            if flow.due:
                flow.queued_at = flow.due_at
                self.clock.push(flow.due_at, flow.due, self._due, flow, flow.due)
            return
        self._settle(flow)
        flow.remaining = 0.0
        self._remove(flow)
        flow.done()

    def _rerate(self, links: tuple[Link, ...], new: Flow | None) -> None:
        """Progressive filling over the flows on `links`, within what their links have left.

        A re-rating touches a few flows (1-10 at kraken's 2,600 hosts) and their links, so
        its cost was its containers: what each link has left and how many of its flows are
        unrated are kept on the link (`left`, `n`, valid while `gen` is this re-rating's),
        a flow unrated is marked with it (`mark`), and the links are scanned in the order met,
        as the dict they were kept in was: the same float operations in the same order."""
        self.rerates += 1
        if len(links) == 2:
            flows = links[0].flows
            other = links[1].flows
            if other:
                flows = {**flows, **other} if flows else other
        else:
            flows = {}
            for link in links:
                flows.update(link.flows)
        if not flows:
            return
        gen = self._gen = self._gen + 1
        # Each link of those flows: the capacity it has left for them, and how many of them are
        # not rated yet; a link is out of the filling once all of its are rated (n 0).
        order: list[Link] = []
        for f in flows:
            rate = f.rate
            f.mark = gen
            for link in f.links:
                if link.gen != gen:
                    link.gen = gen
                    link.left = link.capacity - link.alloc + rate
                    link.n = 1
                    order.append(link)
                else:
                    link.left += rate
                    link.n += 1
        rated: list[tuple[Flow, float]] = []
        live = len(order)
        while live:
            best = None
            share = 0.0
            for link in order:  # the tightest link, the first of equals
                n = link.n
                if n:
                    s = link.left / n
                    if best is None or s < share:
                        best, share = link, s
            assert best is not None
            share = max(share, 0.0)
            for f in best.flows:
                if f.mark == gen:
                    f.mark = 0
                    rated.append((f, share))
                    for link in f.links:
                        if link.n == 1:
                            link.n = 0
                            live -= 1
                        else:
                            link.left -= share
                            link.n -= 1
        clock = self.clock
        now = clock.now
        due = self._due
        for f, rate in rated:
            if f is not new and abs(rate - f.rate) <= EPSILON * max(1.0, rate):
                continue
            moved = f.rate * (now - f.since)  # _settle, inlined
            if moved:
                f.remaining -= moved
                for link in f.links:
                    link.carried += moved
            f.since = now
            for link in f.links:
                link.alloc += rate - f.rate
            f.rate = rate
            if rate > 0:
                t = max(now + max(f.remaining, 0.0) / rate, now)
                f.due_at, f.due = t, clock.reserve()
                if not f.queued or (t, f.due) < (f.queued_at, f.queued):
                    f.queued_at, f.queued = t, f.due
                    clock.push(t, f.due, due, f, f.due)
            else:
                f.due = 0
