"""Rule changes tried in the simulation without editing the rules: each patches the real
module in this process only, so a before/after is the same code with one change."""

from __future__ import annotations

from collections.abc import Callable

import scheduler.state
from bench.sim import swarm
from common.models import PeerRegistration
from peer.engine import ask_plan, reader

_register = scheduler.state.ClusterState.register


def idc_blind() -> None:
    """The scheduler is not told the hosts' IDC and location labels (they register with
    none) while the network keeps its IDC links: what the IDC rules save (a piece crossing
    into an IDC once, `_copy_in_flight`; near holders only, `rank_parents`). (The earlier
    `idc-local`, near holders only whenever there is one, is the rule itself since ca29ad2.)"""
    def register(self: scheduler.state.ClusterState, reg: PeerRegistration, now: float
                 ) -> scheduler.state.PeerState:
        return _register(self, reg.model_copy(update={"idc": "", "location": ""}), now)
    scheduler.state.ClusterState.register = register  # type: ignore[method-assign]


def children(n: int) -> None:
    scheduler.state.CHILDREN_PER_HOLDER = n


# -- the reader's ask order (reader.py `split_window`, ask_plan.py `far_pieces`) -------------

def far_share() -> None:
    """The reader's far share on (reader.py FAR_SHARE, off by default since stop 20): a whole
    read keeps three quarters of a window more in flight from a far cursor drawn per read."""
    swarm.split_window = lambda window, whole: (  # type: ignore[assignment]
        reader.split_window(window, whole, 3))


def in_order() -> None:
    """The reader without a far share (its default since stop 20) nor a spread share: a whole
    read asks its whole window in order, so every host wants the same pieces at once."""
    swarm.split_window = lambda window, whole: (window, 0)  # type: ignore[assignment]
    no_spread()


def no_spread() -> None:
    """No spread share (ask_plan.py SPREAD, on by default since stop 26): a fast whole read
    asks its window in order, as before the spread share."""
    ask_plan.SPREAD = False


def spread() -> None:
    """The spread share on (ask_plan.py SPREAD), whatever its default."""
    ask_plan.SPREAD = True


def spread_idc() -> None:
    """Hosts with an IDC label draw the spread share too (ask_plan.py SPREAD_IDC, off by
    default), the scheduler keeping the task's leases in one IDC (LEASE_IDC)."""
    spread()
    ask_plan.SPREAD_IDC = True
    scheduler.state.LEASE_IDC = True


def lease_any_idc() -> None:
    """Origin leases in every IDC at once (scheduler.state.LEASE_IDC off, its default since
    stop 26) even beside `spread-idc`'s spread: a requester with an IDC label leases what
    nobody holds whichever IDC leases too."""
    scheduler.state.LEASE_IDC = False


def near_quarter() -> None:
    """A quarter of the window in order and the rest far (23a5b0a), in place of the whole
    window in order and three quarters of one far (reader.py)."""
    swarm.split_window = lambda window, whole: (  # type: ignore[assignment]
        (max(1, window // 4), window - max(1, window // 4)) if whole else (window, 0))


def far_rarest() -> None:
    """The far share taken rarest first, as BitTorrent does: the pieces with the fewest
    holders in the scheduler's view (which no peer has; the nearest of equals), in place of a
    cursor from a start drawn per read. Every host then picks the same rarest pieces."""
    far_share()
    read = swarm.Swarm._read
    sim: list[swarm.Swarm] = []

    def rarest(lo: int, count: int, cursor: int, room: int, skip: Callable[[int], bool]
               ) -> tuple[list[int], int]:
        pieces = sim[-1].state.tasks[swarm.TASK].pieces
        held = [(len(p.holders) if (p := pieces.get(j)) is not None else 0, j)
                for j in range(lo, count) if not skip(j)]
        return [j for _, j in sorted(held)[:room]], cursor

    def reading(self: swarm.Swarm, host: swarm.Host) -> None:
        sim[:] = [self]
        read(self, host)

    ask_plan.far_pieces = rarest  # type: ignore[assignment]
    swarm.Swarm._read = reading  # type: ignore[method-assign]


def far_held() -> None:
    """The far share takes only pieces some host holds (the scheduler's view): no origin
    lease for a far piece, so the origin sends one run at a time as before."""
    far_share()
    read = swarm.Swarm._read
    walk = ask_plan.far_pieces
    sim: list[swarm.Swarm] = []

    def held(lo: int, count: int, cursor: int, room: int, skip: Callable[[int], bool]
             ) -> tuple[list[int], int]:
        pieces = sim[-1].state.tasks[swarm.TASK].pieces

        def unheld(j: int) -> bool:
            p = pieces.get(j)
            return skip(j) or p is None or not p.holders
        return walk(lo, count, cursor, room, unheld)

    def reading(self: swarm.Swarm, host: swarm.Host) -> None:
        sim[:] = [self]
        if not host.plan.far:  # nothing held was left: look again
            host.plan.far = reader.split_window(self.window, True, 3)[1]
            host.plan.cursor = 0
        read(self, host)

    ask_plan.far_pieces = held  # type: ignore[assignment]
    swarm.Swarm._read = reading  # type: ignore[method-assign]


def whole_leases() -> None:
    """Leases in whole runs, as before the spread (scheduler.state.LEASE_SPREAD = 0): one
    requester leases every piece it asks that nobody holds or leases."""
    scheduler.state.LEASE_SPREAD = 0


def no_slow() -> None:
    """Slow holders offered like any other (scheduler.policy.SLOW_SHARE = 0): nothing is
    slow beside anything, so neither ranking nor spread leases look at upload rates."""
    scheduler.policy.SLOW_SHARE = 0.0


EXPERIMENTS = {
    "no-slow": no_slow,
    "whole-leases": whole_leases,
    "far-share": far_share,
    "far-held": far_held,
    "idc-blind": idc_blind,
    "in-order": in_order,
    "no-spread": no_spread,
    "spread": spread,
    "spread-idc": spread_idc,
    "lease-any-idc": lease_any_idc,
    "near-quarter": near_quarter,
    "far-rarest": far_rarest,
}
