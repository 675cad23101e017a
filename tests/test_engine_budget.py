"""The disk budget (peer/engine/budget.py): quota watermarks, the free-space floor and what a
full disk evicts down to, as plain arithmetic."""

from __future__ import annotations

from peer.engine.budget import (
    FREE_FLOOR_MAX,
    FREE_FLOOR_SHARE,
    QUOTA_HIGH,
    QUOTA_LOW,
    DiskBudget,
    Floor,
)

MiB, GiB = 1 << 20, 1 << 30


def test_below_the_high_watermark_nothing_is_evicted() -> None:
    b = DiskBudget(quota=100 * MiB)
    assert b.quota_evict_to(int(QUOTA_HIGH * 100 * MiB) - MiB, MiB) is None
    assert not b.over_quota(90 * MiB, MiB)


def test_above_the_high_watermark_evict_down_to_the_low_one_leaving_room_for_the_write() -> None:
    b = DiskBudget(quota=100 * MiB)
    assert b.quota_evict_to(95 * MiB, MiB) == int(QUOTA_LOW * 100 * MiB) - MiB


def test_never_past_the_quota() -> None:
    b = DiskBudget(quota=100 * MiB)
    assert not b.over_quota(99 * MiB, MiB)
    assert b.over_quota(99 * MiB, MiB + 1)


def test_without_a_quota_only_the_floor_limits() -> None:
    b = DiskBudget()
    assert b.quota_evict_to(10 * GiB, GiB) is None
    assert not b.over_quota(10 * GiB, GiB)


def test_the_floor_is_a_share_of_the_filesystem_at_most_a_gibibyte() -> None:
    assert Floor.of((5 * GiB, 10 * GiB)) == Floor(5 * GiB, int(FREE_FLOOR_SHARE * 10 * GiB))
    assert Floor.of((5 * GiB, 1000 * GiB)) == Floor(5 * GiB, FREE_FLOOR_MAX)
    assert Floor.of(None) is None


def test_a_write_must_leave_the_floor_free_and_eviction_frees_twice_it() -> None:
    floor = Floor(free=100 * MiB, keep=50 * MiB)
    assert floor.room(50 * MiB)
    assert not floor.room(50 * MiB + 1)
    # 80 MiB to write: free 100 - 80 = 20 < 50. Evict so that 2 * 50 stay free after it.
    stored = 500 * MiB
    target = floor.evict_to(stored, 80 * MiB)
    freed = stored - target
    assert 100 * MiB + freed - 80 * MiB == 2 * 50 * MiB


def test_a_full_disk_evicts_a_quarter_or_down_to_twice_the_floor_whichever_is_more() -> None:
    assert DiskBudget.full_evict_to(400 * MiB, None) == 300 * MiB
    # A quarter (100 MiB) would leave 0 + 100 < 2 * 80 free: evict 160.
    assert DiskBudget.full_evict_to(400 * MiB, Floor(0, 80 * MiB)) == 240 * MiB
    # Plenty free already: the quarter.
    assert DiskBudget.full_evict_to(400 * MiB, Floor(GiB, 80 * MiB)) == 300 * MiB
