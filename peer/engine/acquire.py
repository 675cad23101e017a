"""How a piece is acquired: the rules, without I/O.

1. Ask the scheduler (requests of a task's workers are batched into one call; pieces that must
   wait for a lease holder long-poll until a holder appears or the lease lapses).
2. `parents`: fetch the chunk from the ranked parents in turn, verify its blake3 before anything
   else sees it; a corrupt, failed or stalled parent is reported and excluded, and the
   scheduler asked again. After PARENT_ROUNDS rounds, fetch from the origin (`parents-failed`).
   Parents that are all at their upload slots are load, not failure: back off and ask again,
   up to BUSY_PATIENCE, then the origin (`parents-busy`).
3. `source`: this peer holds the origin lease for a run of consecutive pieces: one ranged origin
   request covers the whole run (peer/engine/origin.py); a run whose scheduler stopped answering
   for LEASE_LAPSE stops between pieces and the rest is asked about again (its lease has been
   handed on). An on-demand read that waited
   ON_DEMAND_WAIT for another peer's lease goes to the origin for its piece alone (`bypass`).
4. No scheduler: the holders last learnt for the piece; else wait for a scheduler lost moments
   ago, but not past the point where a reader has waited OUTAGE_STALL for the piece (then the
   origin, for that piece alone) or the outage has lasted OUTAGE_PATIENCE (then the origin for
   all): a short outage or partition costs one origin piece per stalled reader, not the
   read-ahead window, and never a stall much past OUTAGE_STALL (`outage_wait`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.models import Decision, ParentRef
from peer.engine.seams import RandomSource

LONG_POLL_MS = 2000
ON_DEMAND_WAIT = 1.0  # DESIGN: an on-demand read waits ~1 s for a lease holder
# A scheduler lost moments ago is waited for (see `outage_wait`): at most this long while a
# reader waits for the piece (on-demand reads: the second figure), else this long.
OUTAGE_STALL, ON_DEMAND_STALL = 5.0, 1.0
OUTAGE_PATIENCE = 15.0
OUTAGE_POLL = 0.25  # how often a piece waiting out an outage looks at its readers again
PARENT_ROUNDS = 3
# Parents all busy: retry every ~BUSY_BACKOFF, for up to this long, before the origin.
BUSY_BACKOFF = 0.05
BUSY_PATIENCE, BUSY_PATIENCE_ON_DEMAND = 10.0, 1.0
ORIGIN_ATTEMPTS = 3


def outage_wait(now: float, since: float, blocked_since: float | None, on_demand: bool) -> float:
    """How much longer a piece that has had no decision since `since` should wait for a
    scheduler lost moments ago before going to the origin (<= 0: go now). `blocked_since`: when
    a reader began waiting for the piece, if one is."""
    wait = since + OUTAGE_PATIENCE - now
    if blocked_since is not None:
        wait = min(wait, blocked_since + (ON_DEMAND_STALL if on_demand else OUTAGE_STALL) - now)
    return wait


def bypass(d: Decision, on_demand: bool, waited: float) -> Decision | None:
    """The answer a piece's worker gets for decision `d`, or None: ask again (the next call
    long-polls). A `wait` for another peer's lease becomes a direct origin fetch of this piece
    alone (no epoch) for an on-demand read that has waited ON_DEMAND_WAIT; never when holders
    exist but are busy (`holders-busy`): then the piece spreads from them, never the origin."""
    if d.action != "wait":
        return d
    if on_demand and waited >= ON_DEMAND_WAIT and d.reason != "holders-busy":
        return Decision(piece=d.piece, action="source", reason="on-demand-wait")
    return None


# -- the state machine: events and `now` in, the next step out -----------------------------
# Steps: what the driver (peer/engine/engine.py `Engine._obtain`) does next.


@dataclass(frozen=True)
class Ask:
    """Ask the scheduler where the piece comes from, these parents excluded."""

    exclude: frozenset[str]


@dataclass(frozen=True)
class Fetch:
    """Fetch the chunk from these parents in turn, verified. `report`: blame failures at the
    scheduler (not when trying the last-known holders because there is none)."""

    chunk: str
    parents: tuple[ParentRef, ...]
    report: bool = True
    source: ClassVar[str] = "peer"
    reason: ClassVar[str | None] = None


@dataclass(frozen=True)
class Pause:
    """Every parent was at its upload slots: wait this long, then ask again."""

    seconds: float


@dataclass(frozen=True)
class AwaitScheduler:
    """Wait up to this long for the scheduler lost moments ago to answer again."""

    seconds: float


@dataclass(frozen=True)
class FromOrigin:
    """Fetch from the origin: under lease `epoch` the run first..last, else this piece alone.
    `reason` is what X-Naiad-Origin-Reason says."""

    reason: str | None
    epoch: int | None = None
    first: int | None = None
    last: int | None = None
    source: ClassVar[str] = "origin"


@dataclass(frozen=True)
class GiveUp:
    """The origin failed too often (or once, without a lease): the piece is unavailable."""


Step = Ask | Fetch | Pause | AwaitScheduler | FromOrigin | GiveUp


# Events: what happened to the last step.


@dataclass(frozen=True)
class Decided:
    """The scheduler's decision (after the batcher's on-demand `bypass`)."""

    decision: Decision


@dataclass(frozen=True)
class NoDecision:
    """The decision call failed: no scheduler answered (`unavailable`) or it refused. `known`:
    the chunk id and holders last learnt for the piece, if any and not tried since."""

    unavailable: bool
    known: tuple[str, list[ParentRef]] | None = None


@dataclass(frozen=True)
class ParentsFailed:
    """No parent gave verified bytes; `failed`: those that failed, stalled or sent corrupt
    bytes (the rest were busy)."""

    failed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Paused:
    pass


@dataclass(frozen=True)
class Waited:
    """The wait for the scheduler ended: it answers again (`back`), or not and it was still
    lost moments ago (`recently_lost`), or long gone."""

    back: bool
    recently_lost: bool


@dataclass(frozen=True)
class OriginFailed:
    """The origin run failed; `lapsed`: it stopped because its lease has lapsed by now (the
    scheduler stopped answering), which is no fault of the origin."""

    lapsed: bool = False


Event = Decided | NoDecision | ParentsFailed | Paused | Waited | OriginFailed

# Which events may follow which step.
_ANSWERS: dict[type, tuple[type, ...]] = {
    Ask: (Decided, NoDecision), Fetch: (ParentsFailed,), Pause: (Paused,),
    AwaitScheduler: (Waited,), FromOrigin: (OriginFailed,), GiveUp: (),
}


class AcquisitionError(Exception):
    """An event that cannot follow the last step (a bug in the driver)."""


class Acquisition:
    """The acquisition of one piece by one worker, without I/O: `start` gives the first step;
    `send` takes what happened to the last one, with `now` (monotonic seconds), whether a
    reader is blocked on the piece on demand, and since when a reader waits for it, and gives
    the next. A fetch or origin step that delivers the piece ends it (the driver returns).
    `rng` jitters the busy back-off."""

    def __init__(self, rng: RandomSource) -> None:
        self.rng = rng
        self.exclude: set[str] = set()
        self.rounds = 0  # rounds of parents that all failed
        self.origin_failures = 0  # of runs under a lease
        self.busy_since: float | None = None
        self.asked = 0.0  # when the last decision was asked for
        self.step: Step | None = None
        self._unavailable = False  # why the last-known holders are being tried

    def start(self, now: float) -> Step:
        return self._ask(now)

    def send(self, event: Event, now: float, on_demand: bool = False,
             waiting_since: float | None = None) -> Step:
        step = self.step
        if step is None or not isinstance(event, _ANSWERS[type(step)]):
            raise AcquisitionError(f"{type(event).__name__} cannot follow {step!r}")
        self.step = self._next(step, event, now, on_demand, waiting_since)
        return self.step

    def _next(self, step: Step, event: Event, now: float, on_demand: bool,
              waiting_since: float | None) -> Step:
        match event:
            case Decided(decision=d):
                if d.action == "parents":
                    assert d.chunk is not None
                    return Fetch(d.chunk, tuple(d.parents))
                return FromOrigin(d.reason, d.epoch, d.first, d.last)
            case NoDecision(unavailable=unavailable, known=known):
                if known is not None:  # tried once: the caller forgets them
                    self._unavailable = unavailable
                    return Fetch(known[0], tuple(known[1]), report=False)
                return self._outage(unavailable, now, on_demand, waiting_since)
            case ParentsFailed(failed=failed):
                assert isinstance(step, Fetch)
                if not step.report:  # the last-known holders: then as without them
                    return self._outage(self._unavailable, now, on_demand, waiting_since)
                if not failed:
                    # Every parent was at its upload slots: that is load, not failure. Back
                    # off and ask again (maybe for other holders) rather than burn a round
                    # and go to the origin, up to a bound.
                    if self.busy_since is None:
                        self.busy_since = now
                    patience = BUSY_PATIENCE_ON_DEMAND if on_demand else BUSY_PATIENCE
                    if now - self.busy_since < patience:
                        return Pause(self.rng.uniform(0.5, 1.5) * BUSY_BACKOFF)
                    return FromOrigin("parents-busy")
                self.exclude |= failed
                self.rounds += 1
                if self.rounds >= PARENT_ROUNDS:
                    return FromOrigin("parents-failed")
                return self._ask(now)
            case Paused():
                return self._ask(now)
            case Waited(back=back, recently_lost=recently_lost):
                if back:
                    return self._ask(now)
                return self._outage(recently_lost, now, on_demand, waiting_since)
            case OriginFailed(lapsed=lapsed):
                assert isinstance(step, FromOrigin)
                if lapsed:
                    return self._ask(now)
                if step.epoch is None:
                    return GiveUp()
                self.origin_failures += 1
                if self.origin_failures >= ORIGIN_ATTEMPTS:
                    return GiveUp()
                return self._ask(now)
        raise AcquisitionError(f"unknown event {event!r}")

    def _ask(self, now: float) -> Ask:
        self.asked = now
        self.step = Ask(frozenset(self.exclude))
        return self.step

    def _outage(self, wait_for: bool, now: float, on_demand: bool,
                waiting_since: float | None) -> Step:
        """No decision: wait for a scheduler lost moments ago while `outage_wait` allows
        (polling every OUTAGE_POLL, so a reader that starts waiting shortens the wait), else
        the origin for this piece alone."""
        if wait_for:
            wait = outage_wait(now, self.asked, waiting_since, on_demand)
            if wait > 0:
                return AwaitScheduler(min(wait, OUTAGE_POLL))
        return FromOrigin("scheduler-unreachable")
