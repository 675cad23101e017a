"""Where a pull's time goes (`python -m bench.sim ... --report`): the gap to the fluid bound
attributed by sampling the swarm every `dt` simulated seconds.

Each sample of a host still pulling takes its downlink's use (the share of its capacity its
flows get) and, for what is unused, the host's state, in this order of precedence:

* `full`: the downlink carries >= FULL of its capacity;
* `below-rate`: pieces in flight (parent or origin flows) that together get less: their
  senders' uplinks (or the origin's) are shared with other flows;
* `waiting:<answer>`: nothing in flight and pieces parked at the scheduler, by the answer the
  most of them got (`holders-busy`, `lease-spread`, `wait` for a lease holder's copy, ...);
* `backoff`: nothing in flight, pieces backing off after every parent answered busy;
* `asking`: nothing in flight, schedule calls being sent or answered (round trips);
* `other`: nothing in flight, nothing asked (verifying, the plan's first piece, a full window
  with nothing left to fetch).

The lost capacity (1 - use) x dt of each sample is charged to its state, so the table's
`lost` column adds up to what the pull lost against a link busy from its first instant to its
last. Also per host: the time to its first piece (`start`) and from its 95th percent of the
pieces to its last (`tail`); and per bucket of the pull (a tenth of the fluid bound each) the
mean use of the hosts' downlinks and uplinks and of the origin's link, and the scheduler
replicas (cores, bench/sim/cost.py) that part of the pull kept busy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from bench.sim.swarm import Host, Swarm, Worker, percentile
from peer.engine.acquire import Ask, Fetch, FromOrigin, Pause

FULL = 0.95
TAIL = 0.95  # the tail: from this share of the pieces held to the last


@dataclass
class Bucket:
    samples: int = 0
    pulling: float = 0.0
    down: float = 0.0  # mean use of pulling hosts' downlinks
    up: float = 0.0  # mean use of every live host's uplink
    origin: float = 0.0
    sched_ns: float = 0.0  # the scheduler's CPU in the bucket (bench/sim/cost.py)
    pieces: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class Probe:
    """Samples `sim` every `dt` simulated seconds from `start`; `lines(bound)` the report."""

    def __init__(self, sim: Swarm, dt: float, bucket: float) -> None:
        self.sim, self.dt, self.bucket = sim, dt, bucket
        self.lost: dict[str, float] = defaultdict(float)  # capacity-seconds, by state
        self.time: dict[str, float] = defaultdict(float)  # host-seconds, by state
        self.pulling = 0.0  # host-seconds pulling
        self.buckets: dict[int, Bucket] = defaultdict(Bucket)
        self.first: dict[Host, float] = {}
        self.near: dict[Host, float] = {}
        self.billed = 0.0  # the scheduler's CPU at the last sample
        sim.clock.at(dt, self.sample)

    def sample(self) -> None:
        sim, dt = self.sim, self.dt
        now = sim.clock.now
        if sim.pulling <= 0:
            return
        answers: dict[Worker, str] = {}
        for parked, call in sim.calls.items():
            last = parked._last  # the call's answer as last decided
            for i, (w, _, _) in call.batch.items():
                d = last.get(i)
                if d is not None:
                    answers[w] = d.reason or d.action
        b = self.buckets[int(now / self.bucket)]
        b.samples += 1
        alive = [h for h in sim.hosts if h.alive]
        b.up += sum(h.up.alloc / h.up.capacity for h in alive) / max(1, len(alive))
        b.origin += sim.origin.alloc / sim.origin.capacity
        billed = sim.bill.total_ns
        b.sched_ns += billed - self.billed
        self.billed = billed
        mark = int(TAIL * sim.count)
        pulling = 0
        for h in alive:
            if h.done_at is not None or now < h.start_at:
                continue
            pulling += 1
            if h.have and h not in self.first:
                self.first[h] = now - h.start_at
            if len(h.have) >= mark and h not in self.near:
                self.near[h] = now
            use = min(1.0, h.down.alloc / h.down.capacity)
            b.down += use
            counts: dict[str, int] = defaultdict(int)
            flows = 0
            for w in h.workers.values():
                step = w.acq.step
                if isinstance(step, Fetch):
                    kind = "fetch"
                elif isinstance(step, FromOrigin):
                    kind = "origin"
                elif isinstance(step, Pause):
                    kind = "backoff"
                elif isinstance(step, Ask):
                    kind = answers.get(w, "asking")
                else:
                    kind = "other"
                counts[kind] += 1
            flows = sum(1 for u in h.downloads if u.flow is not None) \
                + sum(1 for r in h.oruns.values() if r.flow is not None)
            for k, v in counts.items():
                b.pieces[k] += v
            if use >= FULL:
                state = "full"
            elif flows:
                state = "below-rate"
            else:
                waits = {k: v for k, v in counts.items()
                         if k not in ("fetch", "origin", "backoff", "asking", "other")}
                if waits:
                    state = "waiting:" + max(sorted(waits), key=waits.__getitem__)
                elif counts.get("backoff"):
                    state = "backoff"
                elif counts.get("asking"):
                    state = "asking"
                else:
                    state = "other"
            self.time[state] += dt
            self.lost[state] += (1.0 - use) * dt
            self.pulling += dt
        b.pulling += pulling
        sim.clock.after(dt, self.sample)

    def lines(self, bound: float) -> list[str]:
        sim = self.sim
        out = ["report: where the pulling hosts' downlink time went (host-seconds; lost = "
               "unused capacity x time)"]
        total = self.pulling or 1e-9
        lost = sum(self.lost.values())
        out.append(f"  pulling {self.pulling:.1f} host-s; used {1 - lost / total:.1%} of the "
                   f"downlinks, lost {lost / total:.1%}")
        for state in sorted(self.time, key=lambda s: -self.lost[s]):
            out.append(f"    {state:<24} {self.time[state] / total:6.1%} of the time, "
                       f"{self.lost[state] / total:6.1%} lost")
        done = [h for h in sim.hosts if h.alive and h.done_at is not None]
        starts = [self.first[h] / bound for h in done if h in self.first]
        tails = [(h.done_at - self.near[h]) / bound for h in done  # type: ignore[operator]
                 if h in self.near]
        if starts and tails:
            out.append(f"  start (first piece held) p50 {percentile(starts, 0.5):.3f}x, max "
                       f"{max(starts):.3f}x; tail (last {1 - TAIL:.0%} of pieces) p50 "
                       f"{percentile(tails, 0.5):.3f}x, max {max(tails):.3f}x the bound")
        out.append("  t/bound  pulling  down   up     origin  replicas  pieces per pulling host by "
                   "step")
        for k in sorted(self.buckets):
            b = self.buckets[k]
            n = b.samples or 1
            per = b.pulling or 1
            kinds = ", ".join(f"{s} {v / per:.1f}" for s, v in
                              sorted(b.pieces.items(), key=lambda kv: -kv[1]) if v / per >= 0.1)
            cores = b.sched_ns / 1e9 / (n * self.dt)
            out.append(f"  {k * self.bucket / bound:5.2f}  {b.pulling / n:7.1f}  "
                       f"{b.down / per:5.1%} {b.up / n:5.1%} {b.origin / n:6.1%}  {cores:8.2f}"
                       f"  {kinds}")
        return out
