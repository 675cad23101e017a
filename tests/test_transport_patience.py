"""How long a parent may stay silent before it is `slow` (peer/parents.py `Patience`): the
pure rule, driven with given times."""

from __future__ import annotations

import pytest

from peer.parents import STALL_BYTES, STALL_FLOOR, STALL_SECONDS, Patience

MiB = 1 << 20


def test_a_peer_that_received_nothing_waits_the_whole_stall() -> None:
    p = Patience()
    assert p.seconds(0.0) == p.seconds(100.0) == STALL_SECONDS


def test_a_fast_peer_gives_up_after_the_floor_and_a_slow_one_after_the_cap() -> None:
    fast, slow = Patience(), Patience()
    for i in range(300):  # 3 s of 4 MiB pieces: 400 MiB/s, and 4 MiB/s
        fast.received(4 * MiB, i / 100)
        if i % 100 == 0:
            slow.received(4 * MiB, i / 100)
    assert fast.rate(3.0) == pytest.approx(400 * MiB, rel=0.1)
    assert fast.seconds(3.0) == STALL_FLOOR
    assert slow.seconds(3.0) == STALL_SECONDS  # the lab's rates: as before


def test_in_between_it_is_the_time_to_receive_stall_bytes() -> None:
    p = Patience()
    for i in range(500):  # 64 MiB/s for 5 s
        p.received(MiB, i / 64)
    now = 499 / 64
    assert p.seconds(now) == pytest.approx(STALL_BYTES / p.rate(now))
    assert STALL_FLOOR < p.seconds(now) < STALL_SECONDS
    assert p.seconds(now) == pytest.approx(0.5, rel=0.05)


def test_patience_grows_back_while_nothing_arrives() -> None:
    p = Patience()
    for i in range(100):
        p.received(4 * MiB, i / 100)
    waits = [p.seconds(1.0 + t) for t in (0.0, 0.5, 1.0, 2.0, 5.0)]
    assert waits == sorted(waits) and waits[0] == STALL_FLOOR and waits[-1] == STALL_SECONDS


def test_a_burst_counts_as_spread_over_the_time_constant() -> None:
    """A pull's first pieces, arrived at once, do not make the peer look fast."""
    p = Patience()
    p.received(8 * MiB, 10.0)
    assert p.rate(10.0) == pytest.approx(8 * MiB)
    assert p.seconds(10.0) == STALL_SECONDS


def test_a_cap_below_the_floor_is_the_cap() -> None:
    p = Patience(cap=0.1)
    for i in range(100):
        p.received(4 * MiB, i / 100)
    assert p.seconds(1.0) == 0.1
