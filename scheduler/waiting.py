"""What a parked long-poll re-decides when it wakes: the pure core of `Waiters`
(scheduler/store.py), which the simulator (bench/sim/swarm.py) runs too.

A schedule call whose every piece must wait is parked. Re-deciding all its pieces (up to the
reader's window, 16) on every wake-up made most of the scheduler's work re-decisions of pieces
nothing had changed for. A `wait` stays a valid answer for a piece until one of these, and each
has its wake-up here:

* the piece is announced (a new holder: parents, or room in the children's share as a child
  finished; the lease holder's copy: its lease ends): `Parking.announced` wakes the calls
  parked longest on it, as many as the room it made (or a number per piece), and those
  re-decide it (with whatever else they were woken for); a call deciding when it lands, or
  answered a moment ago (its peer asks again), decides it again and takes a place. The other
  calls on the piece keep their `wait` for it: the room went to older calls, and re-deciding
  it for every call woken for another piece was most of a crowd's decisions (69,589
  `holders-busy` of 159,283 decisions in bench.sim kraken, 50 hosts);
* a task-wide change: a peer left or expired (its lease or its children's handouts free), the
  map sealed or reset by a blob mismatch: `Parking.everyone`, every piece;
* the clock: a lease lapses without progress, a child's handout or a penalty ages out
  (`lease_timeout`, PENALTY_SECONDS), and whatever else changes a decision without a
  notification (a withdrawal, a corrupt report, a cordon, a peer's new process forgetting its
  holdings, another holder sample): the recheck timer, every piece, every `recheck` seconds
  from the last full decision whatever woke the call in between, so a call woken often by some
  of its pieces still has the others looked at.

The merged answer keeps the last `wait` of each piece not re-decided, and a peer's next call
takes over the waits its last one was answered with (`Parking.take`, within the same recheck
time); the client asks again for every `wait` it is answered (the batcher), so a stale one costs
a re-ask (or holds an on-demand read's origin fallback back until the next full decision),
never a wrong fetch.

A call answered in parts (common/callframes.py PARTS) is not answered at its first decided
piece: each piece decided other than `wait` leaves it (`Parking.settle`, sent in a part) and the
call stays parked, in its place, for the rest until they are all decided or its time runs out.
Answered at once with `wait` for the others, its peer asked again for all of them in a new call
(the batcher): a call, and a decision of each piece left, per piece handed out.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import NamedTuple, Protocol

from common.models import Announce, Decision, ScheduleRequest


class Places(Protocol):
    """A piece's room counted by the requester (`scheduler.state.Room`, by its IDC)."""

    def take(self, peer: str | None) -> bool:
        """Whether a call of `peer` may be admitted after those taken so far (then taken)."""
        ...

    def spent(self) -> bool:
        """Whether no call may be admitted any more."""
        ...


class Parked:
    """One long-polling schedule call: which of its pieces to decide next, and its answer.

    The driver loops: `begin(now)` names the pieces to decide (all of them the first time),
    `decided` merges their decisions into the call's answer; while every piece is `wait` and
    the call is `idle()`, it waits to be woken (`Parking.announced`, `Parking.everyone`) or
    until `recheck_at`, when the driver calls `changed_all` and loops.
    """

    __slots__ = ("_all", "_changed", "_last", "peer", "pieces", "recheck", "recheck_at",
                 "seq", "woken")

    def __init__(self, pieces: Iterable[int], recheck: float, peer: str | None = None) -> None:
        self.pieces: tuple[int, ...] = tuple(dict.fromkeys(pieces))  # once each, in order
        self.peer = peer  # who asks (a room by IDC counts it in its own), if known
        self.recheck = recheck
        self.recheck_at = float("inf")  # set by each full decision
        self.seq = 0  # the order calls were parked in (`Parking`)
        # Deciding, or due to (the driver will look): an announcement need not wake it again.
        self.woken = True
        self._all = True  # every piece is due: never decided, a task-wide change, the timer
        # Pieces due next: woken for, announced while it decided (or, answered, before its
        # peer's next call takes its waits over), left undecided by the call it took over.
        self._changed: set[int] = set()
        self._last: dict[int, Decision] = {}

    def changed_all(self) -> None:
        """A task-wide change or the recheck timer: every piece is due."""
        self._all = True

    def begin(self, now: float) -> tuple[int, ...]:
        """The pieces to decide now, in the call's order (all of them: `pieces` itself; empty:
        none changed); what changes from here on is due next time."""
        self.woken = True
        if self._all:
            self._all = False
            self._changed.clear()
            self.recheck_at = now + self.recheck
            return self.pieces
        if not self._changed:
            return ()
        due, self._changed = self._changed, set()
        return tuple(i for i in self.pieces if i in due)

    def decided(self, decisions: Iterable[Decision]) -> list[Decision]:
        """Merge the decisions of the pieces `begin` named: the call's whole answer, in its
        order, the other pieces as last decided."""
        self.merge(decisions)
        return self.answer()

    def merge(self, decisions: Iterable[Decision]) -> None:
        """Merge the decisions of the pieces `begin` named, without the answer (a call
        answered in parts: `Parking.settle`)."""
        last = self._last
        for d in decisions:
            last[d.piece] = d

    def answer(self) -> list[Decision]:
        """The call's answer as last decided."""
        last = self._last
        return [last[i] for i in self.pieces]

    def idle(self) -> bool:
        """About to wait: False if a change came in while deciding (decide again now); else the
        call waits, and an announcement of one of its pieces may wake it."""
        if self._all or self._changed:
            return False
        self.woken = False
        return True


class Parking:
    """The calls parked on one task, oldest first, and by piece: an announcement touches only
    the calls it wakes (the oldest not woken asking for a piece it adds) and those already
    deciding it meets before them; the walk stops there. Touching every call parked on the
    piece grew with the crowd (`announced` was 12.9 % of bench.sim kraken at 2,600 hosts).

    It also remembers, until their recheck time, the waits of calls answered: a call answered
    because one of its pieces is not `wait` any more leaves the client to ask again at once for
    the others (the batcher), and their first decision in the next call is the one a woken call
    was spared. The next call with the same key (the driver's: a peer, its registry, its
    excluded parents) takes them over (`take`), but for what an announcement made due on them.
    """

    __slots__ = ("_calls", "_left", "_on", "_seq")

    def __init__(self) -> None:
        self._calls: dict[Parked, None] = {}
        self._left: dict[Hashable, Parked] = {}  # answered calls' waits, by key, oldest first
        # Parked calls by piece, oldest first; answered ones remembered, from when answered.
        self._on: dict[int, dict[Parked, None]] = {}
        self._seq = 0

    def __len__(self) -> int:
        """How many calls are parked."""
        return len(self._calls)

    def empty(self, now: float) -> bool:
        """Whether nothing is parked and nothing remembered (what expired is forgotten)."""
        self._sweep(now)
        return not self._calls and not self._left

    def take(self, key: Hashable, pieces: Iterable[int], recheck: float,
             now: float) -> Parked:
        """A new call: what the last call answered with this `key` left as `wait`, not
        made due since and decided within `recheck`, is its answer so far; the rest is due."""
        call = Parked(pieces, recheck, key.peer if isinstance(key, CallKey) else None)
        left = self._left.pop(key, None)
        if left is None:
            return call
        self._unindex(left)
        if now >= left.recheck_at:
            return call
        last, changed = left._last, left._changed
        for i in call.pieces:
            d = last.get(i)
            if d is not None and d.action == "wait" and i not in changed:
                call._last[i] = d
        if call._last:
            call._all = False
            call._changed = {i for i in call.pieces if i not in call._last}
            call.recheck_at = left.recheck_at  # as old as the decisions it took over
        return call

    def leave(self, call: Parked, key: Hashable, now: float) -> None:
        """`call` was answered: no longer parked; its waits are remembered for `key`."""
        self.unpark(call)
        self._sweep(now)
        if call._all or now >= call.recheck_at \
                or not any(d.action == "wait" for d in call._last.values()):
            return
        old = self._left.pop(key, None)
        if old is not None:
            self._unindex(old)
        call.woken = True  # never woken: its peer's next call decides what it is due
        self._left[key] = call
        self._index(call)

    def park(self, call: Parked) -> None:
        if call in self._calls:
            return
        self._seq += 1
        call.seq = self._seq
        self._calls[call] = None
        self._index(call)

    def unpark(self, call: Parked) -> None:
        if call not in self._calls:
            return
        del self._calls[call]
        self._unindex(call)

    def settle(self, call: Parked, decided: Iterable[Decision]) -> list[Decision]:
        """A call answered in parts: of `decided`, the decisions just merged (`Parked.merge`),
        in the call's order, those other than `wait`, which leave it (they are answered now);
        it stays parked, in its place, for the rest. Every piece left was `wait` before them,
        so only those are looked at, not every piece of the call on every decision."""
        last = call._last
        ready = [d for d in decided if d.action != "wait" and last.get(d.piece) is d]
        if not ready:
            return ready
        gone = {d.piece for d in ready}
        call.pieces = tuple(i for i in call.pieces if i not in gone)
        call._changed -= gone
        for i in gone:
            del last[i]
        if call in self._calls:
            self._unindex(call, gone)
        return ready

    def _index(self, call: Parked) -> None:
        for i in call.pieces:
            self._on.setdefault(i, {})[call] = None

    def _unindex(self, call: Parked, pieces: Iterable[int] | None = None) -> None:
        for i in call.pieces if pieces is None else pieces:
            on = self._on.get(i)
            if on is not None:
                on.pop(call, None)
                if not on:
                    del self._on[i]

    def _sweep(self, now: float) -> None:
        """Forget remembered waits past their recheck time, oldest first (roughly: the first
        still fresh stops the sweep)."""
        left = self._left
        while left:
            key, call = next(iter(left.items()))
            if now < call.recheck_at:
                return
            del left[key]
            self._unindex(call)

    def announced(self, pieces: Iterable[int], per_piece: int | Mapping[int, int | Places]
                  ) -> list[Parked]:
        """`pieces` were announced: the calls to wake, oldest first, each due to decide the
        pieces it is woken for; calls already deciding (or answered and remembered) met on
        the way decide them too. Given the room each piece has (the rules'
        `ClusterState.room`, a mapping): for each piece, its calls in order until as many as
        its room are due, those already woken counted (they take places too); a room by IDC
        (`Places`) counts each call in its peer's, and passes over those it has no place for.
        Given a number:
        of the calls not already woken, the `per_piece` x len(pieces) parked first (0: every
        one). Waking a whole crowd had each re-decide only to wait again."""
        changed = set(pieces)
        if not isinstance(per_piece, int):
            return self._wake_room(changed, per_piece)
        limit = per_piece * len(changed)
        idle: dict[Parked, list[int]] = {}
        for i in changed:
            found = 0
            for call in self._on.get(i, ()):
                if call.woken:
                    call._changed.add(i)  # deciding: it decides this piece again
                    continue
                idle.setdefault(call, []).append(i)
                found += 1
                if found == limit:  # the union's oldest `limit` are among these
                    break
        waking = list(idle)
        if per_piece:
            if len(changed) > 1:  # each piece's calls are in order, their union is not
                waking.sort(key=lambda c: c.seq)
            del waking[limit:]
        for call in waking:
            call.woken = True
            call._changed.update(idle[call])
        return waking

    def _wake_room(self, changed: set[int], room: Mapping[int, int | Places]
                   ) -> list[Parked]:
        on, waking = self._on, dict[Parked, None]()
        for i in changed:
            left = room.get(i, 0)
            if not isinstance(left, int):
                self._wake_places(on.get(i, ()), i, left, waking)
                continue
            if left <= 0:
                continue
            for call in on.get(i, ()):
                call._changed.add(i)
                if not call.woken:
                    call.woken = True
                    waking[call] = None
                left -= 1  # woken or waking, it decides this piece
                if not left:
                    break
        woken = list(waking)
        if len(changed) > 1:
            woken.sort(key=lambda c: c.seq)
        return woken

    @staticmethod
    def _wake_places(calls: Iterable[Parked], i: int, places: Places,
                     waking: dict[Parked, None]) -> None:
        if places.spent():
            return
        for call in calls:
            if not places.take(call.peer):
                if places.spent():
                    return
                continue  # none left for its IDC: its `wait` stands
            call._changed.add(i)
            if not call.woken:
                call.woken = True
                waking[call] = None
            if places.spent():
                return

    def everyone(self) -> list[Parked]:
        """A task-wide change: every call is due in full, and woken; nothing remembered holds."""
        for call in self._left.values():
            self._unindex(call)
        self._left.clear()
        calls = list(self._calls)
        for call in calls:
            call.changed_all()
            call.woken = True
        return calls


class CallKey(NamedTuple):
    peer: str
    registry: str | None
    exclude: frozenset[str]


def call_key(req: ScheduleRequest) -> CallKey:
    """What a call's decisions depend on besides its pieces: the key under which a peer's next
    call takes over the waits its last one was answered with (`Parking.take`)."""
    return CallKey(req.peer_id, req.registry, frozenset(req.exclude))


def done(decisions: Iterable[Decision]) -> bool:
    """Whether a long poll answers now: some piece is not `wait`."""
    return any(d.action != "wait" for d in decisions)


def wakes(ann: Announce) -> frozenset[int] | None:
    """Which parked calls an announcement concerns: those asking for a piece it adds (none
    for a progress report alone), or every call on the task (None) when it seals the map (its
    trust, which every decision reads, changed)."""
    if ann.sealed:
        return None
    return frozenset(c.index for c in ann.pieces)
