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
    """The asks of one read over `count` positions: `window` in order, `far` more from a far
    cursor (drawn with `draw` when first needed)."""

    def __init__(self, count: int, window: int, far: int = 0,
                 draw: Draw | None = None) -> None:
        self.count = count
        self.window = window
        self.far = far if draw is not None else 0
        self.draw = draw
        self.pos = 0  # the position the reader reached (waits for, or is serving)
        self.ahead = 0  # positions [0, ahead) have been asked for in order
        self.cursor: int | None = None  # the far share's (None: not drawn yet)
        self.faring: set[int] = set()  # far positions on their way (started by the caller)

    def done(self) -> bool:
        return self.pos >= self.count

    def reached(self, k: int) -> range:
        """The reader is at position k: the in-order positions to ask for now (empty unless
        the window is down to half)."""
        self.pos = k
        if self.ahead > k + self.window // 2:
            return range(0)
        hi = min(k + self.window, self.count)
        asks = range(self.ahead, hi)
        self.ahead = max(self.ahead, hi)
        return asks

    def top_up(self, start: Start) -> list[int]:
        """Ask far positions now (`start` each, at `ahead_priority`), and say which were
        started: none while more than half the far share is on its way; once nothing is left
        to start, none ever again. Only what `start` started counts as on its way."""
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

    def arrived(self, j: int) -> bool:
        """Position j arrived (stored or held): whether it was a far one (then `top_up`)."""
        if j in self.faring:
            self.faring.discard(j)
            return True
        return False

    def passed_through(self, window: int) -> None:
        """A piece passed through uncached (the store took no more): every fetched piece is
        held until reached, so the window narrows to `window` and nothing more is asked far."""
        self.window = min(self.window, window)
        self.far = 0

    def stop(self) -> None:
        """The read ended (or stopped early): arrivals after this ask for no more."""
        self.far = 0
