"""peer/engine/ask_plan.py, the one ask order of every reader (the engine's, bench/sim's,
bench/fleet's): what a read asks for next, driven directly."""

from __future__ import annotations

import pytest

from common.limits import BACKGROUND, DEFAULT, ON_DEMAND
from peer.engine import ask_plan
from peer.engine.ask_plan import (
    AskPlan,
    ahead_priority,
    far_pieces,
    horizon,
    spread_pieces,
    spread_share,
    spreads,
)

MB = 1 << 20


@pytest.fixture(autouse=True)
def spread_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spread share on (ask_plan.SPREAD, off by default) for these tests."""
    monkeypatch.setattr(ask_plan, "SPREAD", True)


def walk(plan: AskPlan, upto: int) -> dict[int, list[int]]:
    """The in-order asks made as a reader reaches each position below `upto`."""
    return {k: list(asks) for k in range(upto) if (asks := plan.reached(k))}


def test_the_window_is_refilled_half_a_window_at_a_time() -> None:
    plan = AskPlan(20, 8)
    assert walk(plan, 20) == {0: list(range(8)), 4: list(range(8, 12)),
                              8: list(range(12, 16)), 12: list(range(16, 20))}
    assert plan.pos == 19 and not plan.done()
    plan.reached(20)
    assert plan.done()


def test_a_small_read_asks_its_whole_range_at_once_and_nothing_beyond() -> None:
    plan = AskPlan(3, 16)
    assert list(plan.reached(0)) == [0, 1, 2]
    assert [list(plan.reached(k)) for k in (1, 2)] == [[], []]


def test_without_a_far_share_nothing_is_asked_ahead_nor_drawn() -> None:
    def draw(n: int) -> int:
        raise AssertionError("no far share: no draw")
    plan = AskPlan(20, 8, 0, draw)
    plan.reached(0)
    assert plan.top_up(lambda j: True) == []


def test_the_far_share_starts_at_its_drawn_cursor_and_is_topped_up_as_it_arrives() -> None:
    plan = AskPlan(24, 8, 6, lambda n: n - 3)
    assert list(plan.reached(0)) == list(range(8))
    got = plan.top_up(lambda j: j >= 8)
    assert got == [21, 22, 23, 8, 9, 10], "from the drawn start, round to the in-order end"
    assert plan.top_up(lambda j: True) == [], "all six on their way"
    assert plan.arrived(21) and plan.arrived(22)
    assert plan.top_up(lambda j: True) == [], "more than half the share on its way"
    assert plan.arrived(23) and not plan.arrived(3), "3 was in order"
    assert plan.top_up(lambda j: 10 < j < 21) == [11, 12, 13], "up to the share again"


def test_only_what_the_caller_started_counts_as_on_its_way() -> None:
    plan = AskPlan(40, 8, 6, lambda n: 20)
    plan.reached(0)
    elsewhere = {21, 22}  # on their way for another read: never this plan's arrivals
    asked: list[int] = []

    def start(j: int) -> bool:
        asked.append(j)
        return j not in elsewhere
    assert plan.top_up(start) == [20, 23, 24, 25, 26, 27], "the six it started"
    assert asked == [20, 21, 22, 23, 24, 25, 26, 27]
    for j in (20, 23, 24, 25):
        assert plan.arrived(j)
    assert plan.top_up(lambda j: True) == [28, 29, 30, 31], "two on their way: up to six"


def test_once_nothing_is_left_far_it_stops_asking() -> None:
    plan = AskPlan(10, 8, 4, lambda n: 0)
    plan.reached(0)
    assert plan.top_up(lambda j: j >= 10) == []
    assert plan.far == 0
    assert plan.top_up(lambda j: True) == []


def test_passing_through_narrows_the_window_and_ends_the_far_share() -> None:
    plan = AskPlan(40, 16, 12, lambda n: 20)
    assert list(plan.reached(0)) == list(range(16))
    plan.passed_through(4)
    assert plan.top_up(lambda j: True) == []
    assert walk(plan, 20)[14] == [16, 17], "refilled as a window of 4"


def test_a_stopped_read_asks_no_more() -> None:
    plan = AskPlan(40, 8, 6, lambda n: 20)
    plan.reached(0)
    got = plan.top_up(lambda j: j >= 8)
    plan.stop()
    for j in got:
        plan.arrived(j)
    assert plan.top_up(lambda j: True) == []


def test_pieces_asked_ahead_are_never_on_demand() -> None:
    assert ahead_priority(ON_DEMAND) == DEFAULT
    assert ahead_priority(DEFAULT) == DEFAULT
    assert ahead_priority(BACKGROUND) == BACKGROUND


def test_the_far_cursor_walks_up_then_wraps_round_to_the_in_order_share() -> None:
    taken = {7, 9}
    got, cursor = far_pieces(4, 12, 8, 3, taken.__contains__)
    assert (got, cursor) == ([8, 10, 11], 4), "7 and 9 skipped; past the end: from lo"
    got, cursor = far_pieces(5, 12, cursor, 3, taken.__contains__)
    assert (got, cursor) == ([5, 6, 8], 9), "round from lo (the reader moved on)"
    assert far_pieces(5, 12, 2, 2, lambda j: False) == ([5, 6], 7), "never behind lo"
    assert far_pieces(5, 12, 9, 4, lambda j: True) == ([], 9), "nothing left"
    assert far_pieces(12, 12, 3, 4, lambda j: False)[0] == [], "in-order share is all"


def test_the_horizon_is_what_the_read_fetches_in_two_seconds_at_most_four_windows() -> None:
    assert ask_plan.HORIZON_SECONDS == 2 and ask_plan.HORIZON_WINDOWS == 4
    assert horizon(16, 300e6, 4 * MB) == 64, "kraken's 300 MB/s: four windows"
    assert horizon(16, 80 * MB, 4 * MB) == 40, "between two and four windows: the rate's"
    assert horizon(16, 31 * MB, 4 * MB) == 16, "under two windows: just the window"
    assert horizon(16, 4e6, 4 * MB) == 16, "the lab's ~4 MB/s"
    assert horizon(16, 1e9, 0) == 16


def test_the_spread_share_is_three_quarters_of_the_window_once_the_reach_is_two_windows(
        ) -> None:
    assert [spread_share(16, r) for r in (16, 31, 32, 64)] == [0, 0, 12, 12]
    assert spread_share(5, 10) == 3, "the in-order part keeps the rounding"


def test_the_spread_share_is_spread_quarters_of_the_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ask_plan, "SPREAD_QUARTERS", 2)
    assert [spread_share(16, r) for r in (16, 31, 32, 64)] == [0, 0, 8, 8]
    assert spread_share(5, 10) == 2, "the in-order part keeps the larger part of an odd one"


def test_a_fast_read_draws_three_quarters_of_its_window_ahead() -> None:
    plan = AskPlan(200, 16, 0, lambda n: 0, spread=True, piece_size=4 * MB, since=10.0)
    on_way: set[int] = set(plan.reached(0))
    plan.top_up(lambda j: True, 10.0)
    fast(plan, 0.5, 8)  # 64 MiB/s: two windows in two seconds
    on_way.update(plan.reached(8))
    assert plan.top_up(lambda j: j not in on_way and not on_way.add(j), 10.5) == \
        list(range(24, 36)), "12 of the 16 drawn ahead, from the drawn start (the window's end)"
    assert plan.share == 12
    for k in range(9, 22):
        assert not plan.reached(k), "asked to 24 in order: refilled at half the quarter (4)"
    assert list(plan.reached(22)) == [24, 25], "the in-order quarter: 22-25"


def test_spread_pieces_are_a_run_from_a_drawn_start_round_to_lo() -> None:
    taken = {13}
    started: list[int] = []

    def start(j: int) -> bool:
        if j in taken:
            return False
        started.append(j)
        return True
    draws: list[int] = []

    def draw(n: int) -> int:
        draws.append(n)
        return n - 2
    assert spread_pieces(10, 16, 4, start, draw) == [14, 15, 10, 11], "13 held; round to 10"
    assert draws == [6], "drawn in [lo, hi)"
    assert started == [14, 15, 10, 11]
    assert spread_pieces(10, 10, 4, start, draw) == [], "no room between lo and hi"
    assert spread_pieces(10, 16, 0, start, draw) == []


def fast(plan: AskPlan, seconds: float, pieces: int) -> None:
    """`pieces` of 4 MiB arrived for the read by `seconds` after it started."""
    for _ in range(pieces):
        plan.arrived(-1, 4 * MB)
    assert plan.rate(plan.since + seconds) == pieces * 4 * MB / seconds


def test_a_fast_read_draws_half_its_window_ahead_with_each_in_order_refill(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ask_plan, "SPREAD_QUARTERS", 2)  # the share of P2's traces below
    plan = AskPlan(200, 16, 0, lambda n: n - 3, spread=True, piece_size=4 * MB, since=10.0)
    on_way: set[int] = set()

    def start(j: int) -> bool:
        if j in on_way:
            return False
        on_way.add(j)
        return True
    on_way.update(plan.reached(0))
    assert on_way == set(range(16))
    assert plan.top_up(start, 10.0) == [], "no rate yet: in order"
    fast(plan, 0.5, 8)  # 64 MiB/s: 32 pieces in two seconds, two windows
    on_way.update(asks := plan.reached(8))
    assert list(asks) == list(range(16, 24))
    assert plan.top_up(start, 10.5) == [37, 38, 39, 24, 25, 26, 27, 28], \
        "half the window: a run from a start drawn past the window, below the horizon (40)"
    assert plan.share == 8
    for k in range(9, 20):
        assert not plan.reached(k), "the in-order half (8) refills at half of it"
        assert plan.top_up(start, 10.5) == [], "spread topped up only with a refill"
    assert plan.arrived(37) is False and plan.arrived(38) is False, "not far ones"
    on_way.update(asks := plan.reached(20))
    assert list(asks) == [24, 25, 26, 27], "in order: on their way already (the caller's)"
    assert plan.top_up(start, 10.5) == [49, 50], "topped up to the whole share (36-52)"


def test_a_slow_read_reads_in_order_as_before() -> None:
    def walk_with(spread: bool) -> dict[int, list[int]]:
        plan = AskPlan(40, 8, 0, lambda n: 0, spread=spread, piece_size=4 * MB, since=0.0)
        asks = {}
        for k in range(40):
            if got := list(plan.reached(k)):
                asks[k] = got
            plan.arrived(k, 4 * MB)
            assert plan.top_up(lambda j: True, 1.0 + k) == []  # ~4 MB/s
        return asks
    assert walk_with(True) == walk_with(False)


def test_no_spread_share_for_a_ranged_read_nor_once_pieces_pass_through(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def drawn(n: int) -> int:
        raise AssertionError("nothing drawn")
    ranged = AskPlan(200, 16, 0, drawn, spread=False, piece_size=4 * MB)
    passed = AskPlan(200, 16, 0, drawn, spread=True, piece_size=4 * MB)
    passed.passed_through(4)
    monkeypatch.setattr(ask_plan, "SPREAD", False)
    off = AskPlan(200, 16, 0, drawn, spread=True, piece_size=4 * MB)
    for plan in (ranged, passed, off):
        plan.reached(0)
        fast(plan, 0.1, 16)
        plan.reached(8)
        assert plan.top_up(lambda j: True, 0.1) == []


def test_with_nothing_left_to_draw_the_whole_window_is_in_order_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ask_plan, "SPREAD_QUARTERS", 2)  # a share of 8 in the trace below
    plan = AskPlan(40, 16, 0, lambda n: 0, spread=True, piece_size=4 * MB)
    plan.reached(0)
    fast(plan, 0.1, 16)
    plan.reached(8)
    assert plan.top_up(lambda j: j >= 36, 0.1) == [36, 37, 38, 39]
    assert plan.share == 8
    for j in (36, 37, 38, 39):
        plan.arrived(j)
    assert list(plan.reached(20)) == [24, 25, 26, 27]
    assert plan.top_up(lambda j: False, 0.1) == [] and plan.share == 0
    assert list(plan.reached(21)) == list(range(28, 37)), "16 in order again"


def test_a_whole_read_spreads_with_an_idc_label_only_with_spread_idc(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler keeps a task's leases in one IDC (scheduler/state.py LEASE_IDC), so a
    labelled peer's spread pieces no longer cross back into the origin's IDC; SPREAD_IDC is
    off by default (the spread's cost on the Redis store)."""
    assert spreads(True, "") and not spreads(True, "idc1")
    assert not spreads(False, "")
    monkeypatch.setattr(ask_plan, "SPREAD_IDC", True)
    assert spreads(True, "") and spreads(True, "idc1")
    assert not spreads(False, "idc1")
