"""Unit tests for scheduler/policy.py: how holders of a piece are ranked for a requester."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.policy import (
    HANDOUT_DECAY_SECONDS,
    SLOW_SHARE,
    STALLED_RATE,
    Candidate,
    decayed,
    load,
    location_affinity,
    rank_parents,
    score,
    slow,
)


def cand(peer_id: str, *, idc: str = "", location: str = "", upload_slots: int = 4,
         active_uploads: int = 0, handouts: float = 0.0, complete: bool = False,
         seed: bool = False, upload_rate: float = 0.0) -> Candidate:
    return Candidate(peer_id=peer_id, idc=idc, location=location, upload_slots=upload_slots,
                     active_uploads=active_uploads, handouts=handouts, complete=complete,
                     seed=seed, upload_rate=upload_rate)


def first(cands: list[Candidate], idc: str = "", location: str = "", seed: int = 0) -> str:
    return rank_parents(cands, idc, location, 3, random.Random(seed))[0].peer_id


def always_first(cands: list[Candidate], idc: str = "", location: str = "") -> str:
    """The first-ranked peer, checked to be the same whatever the tie-break draws."""
    winners = {first(cands, idc, location, seed) for seed in range(30)}
    assert len(winners) == 1, f"no strict preference: {winners}"
    return winners.pop()


# --- slow holders -----------------------------------------------------------------------------

FAST = 10e6


def ranked(cands: list[Candidate], seed: int = 0) -> list[str]:
    return [c.peer_id for c in rank_parents(cands, "", "", 3, random.Random(seed))]


def test_a_slow_holder_is_not_offered_while_another_is() -> None:
    """Slow beside the best known rate of its fellows: left out, even when it is idle and the
    fast ones are busy (a slow upload never stalls, so a child would wait on it)."""
    slow = cand("slow", upload_rate=FAST * SLOW_SHARE * 0.9)
    fast = cand("fast", upload_rate=FAST, active_uploads=4)  # no free slot
    unknown = cand("new")  # never uploaded: not known to be slow
    for seed in range(10):
        assert ranked([slow, fast, unknown], seed)[-1] != "slow"
        assert "slow" not in ranked([slow, fast, unknown], seed)
    assert ranked([cand("ok", upload_rate=FAST * SLOW_SHARE * 1.1), fast], 0)[0] == "ok"


def test_a_stalled_holder_is_slow_beside_one_known_to_finish_uploads() -> None:
    stalled = cand("stalled", upload_rate=STALLED_RATE)
    assert ranked([stalled, cand("ok", upload_rate=1e3, active_uploads=3)]) == ["ok"]
    # Beside holders never measured there is nothing to compare with: big pieces on a slow
    # link may take longer than an interval.
    assert sorted(ranked([stalled, cand("new")])) == ["new", "stalled"]


def test_when_every_holder_is_slow_they_are_ranked_as_usual() -> None:
    a = cand("a", upload_rate=STALLED_RATE, active_uploads=3)
    b = cand("b", upload_rate=STALLED_RATE)
    assert always_first([a, b]) == "b"
    assert sorted(ranked([a, b])) == ["a", "b"]


# --- decay ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "since", "now", "expected"), [
    (1.0, 0.0, 0.0, 1.0),
    (1.0, 0.0, HANDOUT_DECAY_SECONDS, math.exp(-1)),
    (2.0, 1.0, 1.0 + 2 * HANDOUT_DECAY_SECONDS, 2 * math.exp(-2)),
    (5.0, 10.0, 10.0 + HANDOUT_DECAY_SECONDS / 2, 5 * math.exp(-0.5)),
    (3.0, 5.0, 4.0, 3.0),  # a clock going backwards never grows the value
    (0.0, 0.0, 100.0, 0.0),
    (1.0, 0.0, 1000.0, 0.0),
])
def test_decayed(value: float, since: float, now: float, expected: float) -> None:
    assert decayed(value, since, now) == pytest.approx(expected, abs=1e-12)


@given(st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=1e6),
       st.floats(min_value=0, max_value=100), st.floats(min_value=0, max_value=100))
def test_decayed_is_monotonic_and_bounded(value: float, since: float, d1: float,
                                          d2: float) -> None:
    a, b = sorted((d1, d2))
    early, late = decayed(value, since, since + a), decayed(value, since, since + b)
    assert 0.0 <= late <= early <= value


# --- location affinity ------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "expected"), [
    ("a|b|c", "a|b|c", 1.0),
    ("a|b|c", "a|b|x", 2 / 3),
    ("a|b|c", "a|x|c", 1 / 3),  # only the shared prefix counts
    ("a|b|c", "x|b|c", 0.0),
    ("a|b", "a|b|c", 2 / 3),
    ("a", "a|b", 1 / 2),
    ("a", "a", 1.0),
    ("", "a|b", 0.0),
    ("a|b", "", 0.0),
    ("", "", 0.0),
    ("eu|fra|r1", "eu|ams|r1", 1 / 3),
])
def test_location_affinity(a: str, b: str, expected: float) -> None:
    assert location_affinity(a, b) == pytest.approx(expected)
    assert location_affinity(b, a) == pytest.approx(expected)


# --- preferences, one at a time ---------------------------------------------------------------

def test_prefers_free_upload_slots() -> None:
    busy = cand("busy", active_uploads=4)
    free = cand("free")
    assert always_first([busy, free]) == "free"
    assert always_first([free, busy]) == "free"


def test_the_emptier_the_better() -> None:
    cands = [cand("three", active_uploads=3), cand("one", active_uploads=1),
             cand("two", active_uploads=2)]
    ranked = [c.peer_id for c in rank_parents(cands, "", "", 3, random.Random(0))]
    assert ranked == ["one", "two", "three"]


def test_recent_handouts_count_as_load() -> None:
    # Reports lag a heartbeat; handouts are known at once. Load is the larger of the two.
    handed = cand("handed", handouts=3.0)
    reported = cand("reported", active_uploads=1)
    assert always_first([handed, reported]) == "reported"
    assert always_first([cand("h", handouts=1.0, active_uploads=3),
                         cand("r", handouts=2.0, active_uploads=0)]) == "r"


def test_load_is_relative_to_upload_slots() -> None:
    big = cand("big", upload_slots=32, active_uploads=8)  # a quarter busy
    small = cand("small", upload_slots=4, active_uploads=2)  # half busy
    assert always_first([small, big]) == "big"


def test_prefers_same_idc() -> None:
    assert always_first([cand("far", idc="idc2"), cand("near", idc="idc1")], idc="idc1") == "near"


def test_only_the_same_idc_is_offered_whenever_it_has_a_holder() -> None:
    # A busy near holder is offered alone over free far ones, however many: a child tries its
    # parents in turn, so a far one listed second would still take the piece across the thin
    # link (bench.sim idc3: 12x the blob across IDCs with far holders listed after near ones,
    # 2.00x with near ones alone).
    near = cand("near", idc="i1", active_uploads=6)
    far = [cand(f"far{k}", idc="i2", complete=True, seed=True) for k in range(4)]
    ranked = rank_parents([*far, near], "i1", "", 3, random.Random(0))
    assert [c.peer_id for c in ranked] == ["near"]
    # No holder in the IDC: the far ones, ranked as ever.
    assert len(rank_parents(far, "i1", "", 3, random.Random(0))) == 3
    # A requester without an IDC label is offered every holder.
    assert len(rank_parents([*far, near], "", "", 5, random.Random(0))) == 5


def test_empty_idc_matches_nothing() -> None:
    # A requester without an IDC label has no preference between labelled and unlabelled holders.
    winners = {first([cand("x", idc=""), cand("y", idc="idc1")], idc="", seed=s)
               for s in range(30)}
    assert winners == {"x", "y"}


def test_prefers_longer_location_prefix() -> None:
    cands = [cand("zone", location="eu|fra|r9"), cand("rack", location="eu|fra|r1"),
             cand("region", location="eu|ams|r1"), cand("other", location="us|nyc|r1")]
    ranked = [c.peer_id for c in rank_parents(cands, "", "eu|fra|r1", 4, random.Random(0))]
    assert ranked == ["rack", "zone", "region", "other"]


def test_prefers_complete_holders() -> None:
    assert always_first([cand("partial"), cand("whole", complete=True)]) == "whole"


def test_prefers_seeds() -> None:
    assert always_first([cand("plain"), cand("seed", seed=True)]) == "seed"


@pytest.mark.parametrize(("winner", "loser", "idc", "location"), [
    # free slots outweigh a shared location (within an IDC, or without IDC labels)
    (cand("w"), cand("l", location="a|b", active_uploads=3), "", "a|b"),
    (cand("w", idc="i"), cand("l", idc="i", location="a|b", active_uploads=3), "i", "a|b"),
    # the same IDC outweighs a shared location
    (cand("w", idc="i"), cand("l", location="a|b"), "i", "a|b"),
    # a complete holder outweighs a seed
    (cand("w", complete=True), cand("l", seed=True), "", ""),
    # the same IDC outweighs being a seed
    (cand("w", idc="i"), cand("l", seed=True), "i", ""),
])
def test_relative_weights(winner: Candidate, loser: Candidate, idc: str, location: str) -> None:
    assert always_first([loser, winner], idc, location) == "w"


def test_holder_with_free_slot_ranks_before_a_saturated_one() -> None:
    saturated = cand("saturated", location="a|b", active_uploads=4, complete=True, seed=True)
    free = cand("free", active_uploads=2)  # two of four slots free
    assert always_first([saturated, free], "i", "a|b") == "free"


# --- ranking mechanics ------------------------------------------------------------------------

def test_limit() -> None:
    cands = [cand(str(i), active_uploads=i % 4) for i in range(10)]
    rng = random.Random(1)
    assert len(rank_parents(cands, "", "", 3, rng)) == 3
    assert len(rank_parents(cands, "", "", 0, rng)) == 0
    assert len(rank_parents(cands[:2], "", "", 3, rng)) == 2
    assert rank_parents([], "", "", 3, rng) == []


def test_returns_the_given_candidates_and_leaves_the_input_alone() -> None:
    cands = [cand(str(i), active_uploads=(7 * i) % 4) for i in range(6)]
    before = list(cands)
    ranked = rank_parents(cands, "", "", 6, random.Random(2))
    assert cands == before
    assert all(any(r is c for c in cands) for r in ranked)
    assert len({id(r) for r in ranked}) == 6


def test_ties_broken_at_random_so_load_spreads() -> None:
    cands = [cand(f"p{i}") for i in range(4)]
    rng = random.Random(42)
    counts = Counter(rank_parents(cands, "", "", 3, rng)[0].peer_id for _ in range(4000))
    assert set(counts) == {"p0", "p1", "p2", "p3"}
    # 1000 expected each; a binomial sd is ~27, so 850..1150 is more than 5 sd either side.
    assert all(850 <= n <= 1150 for n in counts.values()), counts
    # and not by input position: the first listed is not favoured
    assert counts["p0"] < 1150


def test_tie_break_is_reproducible_with_a_seeded_rng() -> None:
    cands = [cand(f"p{i}") for i in range(8)]
    a = [c.peer_id for c in rank_parents(cands, "", "", 8, random.Random(7))]
    b = [c.peer_id for c in rank_parents(cands, "", "", 8, random.Random(7))]
    assert a == b
    orders = {tuple(c.peer_id for c in rank_parents(cands, "", "", 8, random.Random(s)))
              for s in range(20)}
    assert len(orders) > 1


def test_default_rng_works() -> None:
    cands = [cand("busy", active_uploads=4), cand("free")]
    assert rank_parents(cands, "", "", 1)[0].peer_id == "free"


def test_zero_upload_slots_does_not_divide_by_zero() -> None:
    assert score(cand("z", upload_slots=0), "", "") == pytest.approx(0.5)
    assert score(cand("z", upload_slots=0, active_uploads=1), "", "") == pytest.approx(0.0)


candidates = st.builds(
    cand,
    st.text(alphabet="abcdef", min_size=1, max_size=4),
    idc=st.sampled_from(["", "i1", "i2"]),
    location=st.sampled_from(["", "a", "a|b", "a|c", "a|b|c"]),
    upload_slots=st.integers(min_value=1, max_value=8),
    active_uploads=st.integers(min_value=0, max_value=10),
    handouts=st.floats(min_value=0, max_value=10),
    complete=st.booleans(),
    seed=st.booleans(),
)


@given(st.lists(candidates, max_size=12), st.sampled_from(["", "i1"]),
       st.sampled_from(["", "a|b|c"]), st.integers(min_value=0, max_value=12),
       st.integers(min_value=0, max_value=2**32))
def test_ranking_is_by_score(cands: list[Candidate], idc: str, location: str, limit: int,
                             seed: int) -> None:
    # Among holders that all have a free upload slot, or all have none, the order is by score.
    # (Across the two groups see test_holder_with_free_slot_ranks_before_a_saturated_one.)
    ranked = rank_parents(cands, idc, location, limit, random.Random(seed))
    cands = [c for c in cands if idc and c.idc == idc] or cands  # see test_only_the_same_idc
    assert len(ranked) == min(limit, len(cands))
    kept = {id(c) for c in ranked}
    for group in (True, False):
        members = [c for c in ranked if has_free_slot(c) is group]
        scores = [score(c, idc, location) for c in members]
        assert scores == sorted(scores, reverse=True)
        rest = [score(c, idc, location) for c in cands
                if id(c) not in kept and has_free_slot(c) is group]
        if scores:
            # nothing left out scores higher than the last one kept from its group
            assert all(s <= scores[-1] for s in rest)
        elif rest:
            # a whole group left out: the limit was reached with the other group
            assert len(ranked) == limit


def has_free_slot(c: Candidate) -> bool:
    return max(float(c.active_uploads), c.handouts) < max(1, c.upload_slots)


@given(candidates, st.floats(min_value=0, max_value=5))
def test_more_load_never_scores_higher(c: Candidate, extra: float) -> None:
    busier = replace(c, handouts=max(c.handouts, c.active_uploads) + extra)
    assert score(busier, "i1", "a|b") <= score(c, "i1", "a|b")


# --- the ranking is the documented score, to the draw -----------------------------------------

def reference_rank(cands: list[Candidate], idc: str, location: str, limit: int,
                   rng: random.Random) -> list[Candidate]:
    """rank_parents as the module docstring states it, through `score` and `load`: no free
    slot last, then the best score, then at random, one draw per candidate in their order."""
    if idc:
        cands = [c for c in cands if c.idc == idc] or cands
    best = max((c.upload_rate for c in cands), default=0.0)
    if best:
        cands = [c for c in cands if not slow(c.upload_rate, best)] or cands
    keyed = [(load(c) >= c.upload_slots, -score(c, idc, location), rng.random(), i)
             for i, c in enumerate(cands)]
    return [cands[k[3]] for k in sorted(keyed)[:limit]]


@given(st.integers(0, 2**32 - 1), st.sampled_from(["", "i0"]),
       st.sampled_from(["", "i0|r1", "i1|r2|h3"]))
def test_rank_parents_ranks_by_score_and_draws_as_the_reference(
        seed: int, idc: str, location: str) -> None:
    r = random.Random(seed)
    cands = [Candidate(peer_id=f"p{i}", idc=r.choice(["", "i0", "i1"]),
                       location=r.choice(["", "i0|r1", "i0|r2|h3", "i1|r2|h3"]),
                       upload_slots=r.choice([0, 1, 4]), active_uploads=r.randrange(6),
                       handouts=r.choice([0.0, 0.0, 0.5, 1.0, 3.2]), complete=r.random() < 0.3,
                       seed=r.random() < 0.1, upload_rate=r.choice([0.0, 1.0, 2e5, 1e6, 4e6]))
             for i in range(r.randrange(30))]
    got, want = random.Random(seed), random.Random(seed)
    assert rank_parents(cands, idc, location, 5, got) == reference_rank(
        cands, idc, location, 5, want)
    assert got.random() == want.random()  # as many draws
