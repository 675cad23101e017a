"""How long a piece waits for a scheduler lost moments ago (peer/engine.py `outage_wait`):
the read-ahead waits out a short outage, a waiting reader only up to OUTAGE_STALL."""

from __future__ import annotations

from peer.engine import ON_DEMAND_STALL, OUTAGE_PATIENCE, OUTAGE_STALL, outage_wait


def test_read_ahead_waits_out_the_outage_up_to_the_patience() -> None:
    assert outage_wait(100.0, 100.0, None, False) == OUTAGE_PATIENCE
    assert outage_wait(100.0 + OUTAGE_PATIENCE - 1, 100.0, None, False) == 1.0
    assert outage_wait(100.0 + OUTAGE_PATIENCE, 100.0, None, False) <= 0


def test_a_waiting_reader_bounds_the_wait_from_when_it_began_waiting() -> None:
    # The reader has waited since before the decision call went out (the call's own time,
    # e.g. a partition's timeout, counts).
    assert outage_wait(104.0, 102.0, 100.0, False) == OUTAGE_STALL - 4.0
    assert outage_wait(100.0 + OUTAGE_STALL, 102.0, 100.0, False) <= 0
    # An on-demand read (nydusd) waits far less.
    assert outage_wait(100.5, 100.0, 100.0, True) == ON_DEMAND_STALL - 0.5
    assert outage_wait(101.0, 100.0, 100.0, True) <= 0


def test_the_patience_still_bounds_a_reader_that_began_waiting_late() -> None:
    since = 100.0
    late = since + OUTAGE_PATIENCE - 1.0
    assert outage_wait(late, since, late, False) == 1.0
