"""peer/engine/ask_plan.py, the one ask order of every reader (the engine's, bench/sim's,
bench/fleet's): what a read asks for next, driven directly."""

from __future__ import annotations

from common.limits import BACKGROUND, DEFAULT, ON_DEMAND
from peer.engine.ask_plan import AskPlan, ahead_priority, far_pieces


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
