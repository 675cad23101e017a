"""What a scenario costs the control plane: the scheduler's CPU, measured as the rules run.

The simulator runs the scheduler's real code in its own process, so its cost can be measured
rather than guessed: this thread's CPU time (`time.thread_time_ns`, which a busy neighbour on
the machine does not inflate) around every call into `ClusterState` and into the long polls'
core (`scheduler.waiting.Parking`, as `Waiters` runs it), charged to the simulated second the
call happened in. What the simulator does not run is the scheduler's edge (the framed
connection, the signature check, pydantic's parse and encode of each call): that is priced per
call a peer makes and per piece it carries, at the figures below.

A replica is one scheduler process, one core at most (the rules run on one event loop), so the
replicas a scenario's real-time demand needs are the scheduler CPU-seconds it asks for per
simulated second: over the pull (`replicas=` in the last line) and in its busiest second.
Both are this machine's cores, as bench.fleet's replica figures are.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field

# The framed edge's CPU per call and per piece in it, beyond the rules: `bench/scheduler.py
# --store memory --http --framed --runs 1 --calls 10000 --tasks 200` (one naiad scheduler
# process's CPU per call) less the same calls made on the memory store in process. Edge per
# call, µs: announce1 77, schedule1 122, schedule8 119, announce (16 pieces) 84, register 54
# (18192f2, vm, 2026-12-02 04:59); helper N's two runs at 2652da8's framed edge: announce1 59,
# schedule1 66, schedule8 84. About 80 µs a call; a piece more adds ~0-3 µs.
EDGE_CALL_US = 80.0
EDGE_PIECE_US = 1.0


@dataclass
class Bill:
    """The scheduler's CPU a run asked for, in nanoseconds of this machine's core."""

    call_us: float = EDGE_CALL_US
    piece_us: float = EDGE_PIECE_US
    rules_ns: int = 0  # measured: ClusterState and Parking
    edge_ns: float = 0.0  # priced: the calls that reached the scheduler
    requests: int = 0  # calls that reached the scheduler (schedule, announce, heartbeat, ...)
    by_second: dict[int, float] = field(default_factory=lambda: defaultdict(float))

    def rules(self, now: float, ns: int) -> None:
        self.rules_ns += ns
        self.by_second[int(now)] += ns

    def call(self, now: float, pieces: int = 0) -> None:
        """A call a peer made reached the scheduler's edge, carrying `pieces` pieces."""
        ns = (self.call_us + self.piece_us * pieces) * 1000.0
        self.requests += 1
        self.edge_ns += ns
        self.by_second[int(now)] += ns

    @property
    def total_ns(self) -> float:
        return self.rules_ns + self.edge_ns

    def replicas(self, span: float) -> float:
        """Cores the demand needs over `span` simulated seconds."""
        return self.total_ns / 1e9 / span if span > 0 else math.nan

    def peak(self, span: float) -> float:
        """Cores the busiest whole simulated second of the first `span` needed (the whole
        span's if it is shorter than two seconds)."""
        if span < 2.0:
            return self.replicas(span)
        return max((ns for s, ns in self.by_second.items() if s + 1 <= span),
                   default=0.0) / 1e9


class Cores:
    """The scheduler as `n` cores (`--sched-cores`, an experiment): a piece of its work (a
    call's turn, an announcement) starts when a core is free, in arrival order, and holds it
    for what it cost here (its rules measured, its edge priced), so its answers leave that
    much later. A run then depends on this machine's speed, not on the seed alone."""

    def __init__(self, n: int) -> None:
        self.free = [0.0] * n  # when each core is next free (a heap)
        self.waits: list[float] = []  # of the answers: queued and served, seconds

    def start(self, now: float) -> float:
        """When work arriving now can start."""
        return max(now, self.free[0])

    def ran(self, now: float, seconds: float) -> float:
        """Work that ran now took `seconds`: when it ends (its answers leave). Work that did
        not wait for a core (a heartbeat) takes its time after what the core had queued."""
        end = max(now, self.free[0]) + seconds
        heapq.heapreplace(self.free, end)
        return end
