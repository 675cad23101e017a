"""What a read asks for next, and when: the one place the read-ahead order lives.

A pure core (no asyncio, no I/O) driven by events: the reader reached position k (`reached`),
a piece asked for arrived (`arrived`), pieces passed through uncached (`passed_through`). It
answers with positions to ask for: in order from `reached` (what the client reads next, at
the read's own priority), ahead from `top_up` (asked at `ahead_priority`: never on demand, no
origin bypass). The real reader (peer/engine/reader.py), bench/sim's reader (`Swarm._read`) and
bench/fleet's hosts (`Host.pull`) all drive this class, so a rule change here shows in the
simulation and in the fleet bench at once.

The order: a window of `window` positions in order, refilled half a window at a time (so the
scheduler gets batches and origin leases cover runs, rather than one piece per call). A
whole-blob read may also keep a far share in flight (`far`, reader.py FAR_SHARE: off by
default): from a cursor drawn per read, walking up to the blob's end then round from where
the in-order window ends, topped up half the share at a time as its pieces arrive.

A fast whole-blob read also draws most of its window ahead: the spread share (`spread`). Hosts
reading one blob in order all want the same few newest pieces, whose few holders are then busy
while the other uplinks idle (bench.sim kraken: 1.95x the fluid bound). Once the read's own
rate would fetch two windows or more in HORIZON_SECONDS (`horizon`), SPREAD_QUARTERS quarters
of the window (`spread_share`) are asked as a run from a start drawn between the in-order
window's end and the horizon (`spread_pieces`), the rest in order. It is topped up (to the
whole share) only when the in-order part is refilled, in the same turn, so both ride one
schedule call. A slow read (the origin-bound lab) never reaches two windows and reads in
order as before. A peer with an IDC label reads in order unless SPREAD_IDC (`spreads`; off for
the spread's cost on the Redis store): then the scheduler leases a spread piece nobody holds
only within the one IDC leasing the task's pieces, so it does not cross back (bench.sim idc3).

Positions are indices into the read's pieces (for a whole-blob read, the pieces themselves).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from common.limits import DEFAULT

Skip = Callable[[int], bool]  # a position stored or on its way already
# Start asking for a position unless it is stored or on its way: whether this call started it.
# The plan counts as on their way only the positions the caller really started.
Start = Callable[[int], bool]
Draw = Callable[[int], int]  # randrange(n): where a read's far cursor starts


# How far ahead a fast whole read may draw its spread share: what its rate fetches in
# HORIZON_SECONDS, at most HORIZON_WINDOWS windows; under two windows, no spread share.
HORIZON_SECONDS = 2.0
HORIZON_WINDOWS = 4
# On since stop 26: bench.sim kraken 50 1.948x -> 1.235x p50 (1.954x -> 1.302x p99). Off in
# stop 25 for idc3 (2.73x the blob across IDCs: a peer with an IDC label no longer spreads,
# `spreads`) and die1 (p99 1.44x base's: a child of the dead host waited STALL_SECONDS with its
# read blocked; now its `Patience`, peer/parents.py: 1.06x). `python -m bench.sim --experiment
# no-spread` (or `spread`) and `bench.fleet --spread` set it in one process.
SPREAD = True  # whole reads draw a spread share once fast (False: in order, as before)
# Quarters of a fast whole read's window drawn ahead (the rest in order). With half (P2's),
# kraken's uplinks still idled 14 % in steady state: every host's in-order half wanted the
# same newest pieces, whose holders split their uplinks between children of several pieces
# (`--report`: below-rate 24 % of the pull, 12 % of the downlinks lost), while the uplinks
# holding older pieces had nothing anyone asked. Three quarters: bench.sim kraken 50 p50
# 1.250x -> 1.211x, p99 1.319x -> 1.267x, base 40 1.408x -> 1.310x (helper K8, stop 27), for
# ~17 % more decisions (the in-order quarter refills twice as often).
SPREAD_QUARTERS = 3


# Whether peers with an IDC label spread too. The scheduler keeps a task's origin leases in
# one IDC at a time (scheduler/state.py LEASE_IDC), so a spread piece nobody holds waits for
# that IDC's copy rather than being leased in another and crossing back: bench.sim idc3 60
# 3.76x / 4.37x the bound in order -> 2.91x / 3.48x, 2.00x across both (helper P7, stop 26).
# Off: bench.fleet --store redis, whose hosts have IDC labels, then fell from 2,330-2,582 to
# 1,553-1,641 pieces per CPU-second with 4 of 64 pulls done in 30 s (the spread share's cost
# on Redis, P5's, not the lease rule's). `--experiment spread-idc` (bench.sim) turns it on.
SPREAD_IDC = False


def spreads(whole: bool, idc: str) -> bool:
    """Whether a read may draw a spread share: a whole-blob read, of a peer with an IDC label
    only with SPREAD_IDC. Before the scheduler kept a task's leases in one IDC, each spread
    piece nobody held yet was leased to the peer that drew it, whatever its IDC, and so crossed
    from the origin into that IDC and back into the origin's (bench.sim idc3 60 hosts: 2.73x
    the blob across IDCs, 2.00x in order; target <= 2.2x)."""
    return whole and (SPREAD_IDC or not idc)


def horizon(window: int, rate: float, piece_size: int) -> int:
    """Positions ahead of the reader a whole read may ask: what arrives in HORIZON_SECONDS at
    `rate` bytes/s, at most HORIZON_WINDOWS windows; just the window while under two."""
    if piece_size <= 0:
        return window
    reach = min(HORIZON_WINDOWS * window, int(rate * HORIZON_SECONDS / piece_size))
    return reach if reach >= 2 * window else window


def spread_share(window: int, reach: int) -> int:
    """Positions of the window drawn ahead within `reach`: SPREAD_QUARTERS quarters of it once
    the reach is two windows or more (the in-order part keeps the rest), else none."""
    return window * SPREAD_QUARTERS // 4 if reach >= 2 * window else 0


def spread_pieces(lo: int, hi: int, room: int, start: Start, draw: Draw) -> list[int]:
    """Up to `room` positions in [lo, hi) as a run from a start drawn there, upward and round
    to lo, `start`ed one by one (those already stored or on their way passed over): what was
    started."""
    if hi <= lo or room <= 0:
        return []
    return far_pieces(lo, hi, lo + draw(hi - lo), room, lambda j: not start(j))[0]


def ahead_priority(priority: int) -> int:
    """A piece asked ahead is not what the client waits on: never on demand (no origin
    bypass), at most DEFAULT."""
    return min(priority, DEFAULT)


def far_pieces(lo: int, count: int, cursor: int, room: int, skip: Skip
               ) -> tuple[list[int], int]:
    """Up to `room` pieces for a whole-blob read's far share, and the cursor to go on from:
    walking up from `cursor` to the blob's end, then round from `lo` (where the in-order share
    ends), passing over the pieces `skip` says are stored or on their way."""
    got: list[int] = []
    cursor = max(cursor, lo)
    for j in itertools.chain(range(cursor, count), range(lo, cursor)):
        if len(got) >= room:
            break
        if not skip(j):
            got.append(j)
    if got:
        cursor = got[-1] + 1
    return got, cursor if cursor < count else lo


class AskPlan:
    """The asks of one read over `count` positions: `window` in order (less the spread share
    while it is on), `far` more from a far cursor (drawn with `draw` when first needed).
    `spread`: a whole read of pieces of `piece_size` bytes, started at time `since`, that may
    draw a spread share (with `draw`) once its rate is high enough (SPREAD)."""

    def __init__(self, count: int, window: int, far: int = 0,
                 draw: Draw | None = None, *, spread: bool = False, piece_size: int = 0,
                 since: float = 0.0) -> None:
        self.count = count
        self.window = window
        self.far = far if draw is not None else 0
        self.draw = draw
        self.pos = 0  # the position the reader reached (waits for, or is serving)
        self.ahead = 0  # positions [0, ahead) have been asked for in order
        self.cursor: int | None = None  # the far share's (None: not drawn yet)
        self.faring: set[int] = set()  # far positions on their way (started by the caller)
        self.spread = spread and SPREAD and draw is not None and piece_size > 0
        self.piece_size = piece_size
        self.since = since
        self.fetched = 0  # bytes of the pieces asked for that arrived (the read's rate)
        self.share = 0  # the spread share now (positions of the window drawn ahead)
        self.spreading: set[int] = set()  # spread positions on their way
        self.refilled = False  # the in-order part was refilled since the last top_up

    def done(self) -> bool:
        return self.pos >= self.count

    def reached(self, k: int) -> range:
        """The reader is at position k: the in-order positions to ask for now (empty unless
        the window is down to half)."""
        self.pos = k
        window = self.window - self.share
        if self.ahead > k + window // 2:
            return range(0)
        hi = min(k + window, self.count)
        asks = range(self.ahead, hi)
        self.ahead = max(self.ahead, hi)
        self.refilled = self.refilled or bool(asks)
        return asks

    def rate(self, now: float) -> float:
        """Bytes per second the read has fetched since it started."""
        elapsed = now - self.since
        return self.fetched / elapsed if elapsed > 0 else 0.0

    def top_up(self, start: Start, now: float = 0.0) -> list[int]:
        """Ask positions ahead now (`start` each, at `ahead_priority`), and say which were
        started. Only what `start` started counts as on its way. The spread share right after
        an in-order refill (`now`: the time, for the read's rate), then the far share: none
        while more than half of it is on its way; once nothing is left to start, none ever
        again."""
        got = self._spread_up(start, now) if self.refilled else []
        self.refilled = False
        return got + self._far_up(start)

    def _spread_up(self, start: Start, now: float) -> list[int]:
        if not self.spread:
            return []
        reach = horizon(self.window, self.rate(now), self.piece_size)
        self.share = spread_share(self.window, reach)
        assert self.draw is not None
        got = spread_pieces(self.pos + self.window, min(self.count, self.pos + reach),
                            self.share - len(self.spreading), start, self.draw)
        self.spreading.update(got)
        if not self.spreading:
            self.share = 0  # nothing left to draw ahead: the whole window in order again
        return got

    def _far_up(self, start: Start) -> list[int]:
        if not self.far or len(self.faring) > self.far // 2:
            return []
        if self.cursor is None:
            assert self.draw is not None
            self.cursor = self.draw(self.count)
        got, self.cursor = far_pieces(self.pos + self.window, self.count, self.cursor,
                                      self.far - len(self.faring), lambda j: not start(j))
        if not got:
            self.far = 0  # the rest is stored or on its way: the in-order share sees to it
        self.faring.update(got)
        return got

    def arrived(self, j: int, size: int = 0) -> bool:
        """Position j arrived (stored or held; `size` bytes fetched for this read, 0 if it
        failed): whether it was a far one (then `top_up`)."""
        self.fetched += size
        self.spreading.discard(j)
        if j in self.faring:
            self.faring.discard(j)
            return True
        return False

    def passed_through(self, window: int) -> None:
        """A piece passed through uncached (the store took no more): every fetched piece is
        held until reached, so the window narrows to `window` and nothing more is asked far."""
        self.window = min(self.window, window)
        self.far = 0
        self.spread = False
        self.share = 0

    def stop(self) -> None:
        """The read ended (or stopped early): arrivals after this ask for no more."""
        self.far = 0
        self.spread = False
