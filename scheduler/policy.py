"""Placement policy: which holders of a piece a requester is told to fetch it from.

Pure functions over plain values, so the rule can be read and tested as a table:

* A holder's **load** is the larger of the uploads it reported and a decaying count of the
  children it was recently handed (reports lag by a heartbeat; handouts are known at once).
  Holders with a free upload slot always rank before holders without one; within each group the
  emptier the better (load beyond the slots keeps counting), so fifty children asking for one
  piece spread evenly over every holder instead of piling onto one.
* A requester with an IDC label is offered only holders of its IDC whenever it has one, busy
  or not (the children's share still caps them, `ClusterState._admit_child`): a piece crosses
  the thin link into an IDC once and spreads inside it. Ranking free holders first (a free far
  one before a busy near one) sent ~98x the blob across IDC links in bench.sim's idc3 (300
  hosts); near ones alone, with ClusterState's copy-in-flight wait, 2.00x. Far holders listed
  after the near ones still crossed 12x (60 hosts): a child tries its parents in turn.
* A holder known to upload at under SLOW_SHARE of the best rate among the others (ClusterState
  estimates each peer's from its heartbeats) is offered only when every one is that slow.
* Then **proximity**: same IDC, then the longest shared prefix of the `a|b|c` location.
* Then holders that **finished** the task (they will not leave mid-way for lack of pieces) and
  **seed** peers.
* Penalised (recently failed, slow or corrupt), cordoned and excluded holders are never handed
  out; the caller filters them before ranking.
"""

from __future__ import annotations

import functools
import math
import operator
import random
from dataclasses import dataclass

HANDOUT_DECAY_SECONDS = 0.5
W_LOAD, W_IDC, W_LOCATION, W_COMPLETE, W_SEED = 0.5, 0.15, 0.1, 0.15, 0.1


@dataclass(slots=True)
class Candidate:
    peer_id: str
    idc: str
    location: str
    upload_slots: int
    active_uploads: int
    handouts: float  # decayed count of recent handouts
    complete: bool
    seed: bool
    upload_rate: float = 0.0  # bytes/s it uploads at while it has uploads (0.0: not known)


# A holder uploading at under this share of the best of its fellow candidates' rates (those
# known) is not offered while another is: a slow uplink still sends bytes, so it never stalls
# a child into blaming it, while its children, reading in order, wait on it (bench.sim lab16
# with a quarter of the uplinks at 1/20: p99 4.7x the fluid bound).
SLOW_SHARE = 0.25
# The rate ClusterState gives a peer whose uploads ran a whole interval and none finished.
STALLED_RATE = 1.0


def decayed(value: float, since: float, now: float) -> float:
    """`value` after exponential decay from `since` to `now`."""
    if not value:  # most holders were handed out nothing lately: no exp
        return value
    return value * math.exp(-max(0.0, now - since) / HANDOUT_DECAY_SECONDS)


# Cached: a requester's location is weighed against every candidate's on every decision, and a
# fleet has few distinct locations (racks), so pairs repeat; bounded for fleets with many.
@functools.lru_cache(maxsize=4096)
def location_affinity(a: str, b: str) -> float:
    """Fraction of `a`'s location path shared with `b` from the root (1.0: same place)."""
    if not a or not b:
        return 0.0
    pa, pb = a.split("|"), b.split("|")
    shared = 0
    for x, y in zip(pa, pb, strict=False):
        if x != y:
            break
        shared += 1
    return shared / max(len(pa), len(pb))


# Per requester location, W_LOCATION times its affinity to each candidate location met: a
# fleet has few distinct locations (racks). Bounded like location_affinity's cache: each map,
# and the map of them, cleared whole at _LOCATION_TERMS_MAX entries.
_LOCATION_TERMS: dict[str, dict[str, float]] = {}
_LOCATION_TERMS_MAX = 256


def _location_terms(location: str) -> dict[str, float]:
    terms = _LOCATION_TERMS.get(location)
    if terms is None:
        if len(_LOCATION_TERMS) >= _LOCATION_TERMS_MAX:
            _LOCATION_TERMS.clear()
        terms = _LOCATION_TERMS[location] = {}
    return terms


def load(c: Candidate) -> float:
    return max(float(c.active_uploads), c.handouts)


def score(c: Candidate, idc: str, location: str) -> float:
    return _score(c, load(c), idc, location)


def _score(c: Candidate, load: float, idc: str, location: str) -> float:
    free = 1.0 - load / max(1, c.upload_slots)  # negative when over its slots
    return (W_LOAD * free
            + W_IDC * (1.0 if idc and c.idc == idc else 0.0)
            + W_LOCATION * location_affinity(location, c.location)
            + W_COMPLETE * c.complete
            + W_SEED * c.seed)


def rank_parents(candidates: list[Candidate], idc: str, location: str, limit: int,
                 rng: random.Random | None = None) -> list[Candidate]:
    """The best `limit` candidates, best first, only those of the requester's IDC if any is;
    ties broken at random so load spreads."""
    rand = (rng or random).random
    if idc:
        candidates = [c for c in candidates if c.idc == idc] or candidates
    best = max(map(_RATE, candidates), default=0.0)
    if best:  # a slow holder is offered only when every one is (`slow`, inlined)
        cut = SLOW_SHARE * best
        candidates = [c for c in candidates if not 0.0 < c.upload_rate < cut] or candidates
    # Every admitted decision ranks up to HOLDER_SAMPLE candidates: `load` and `_score`
    # inlined (three calls a candidate were half the ranking's cost), the same float operations
    # in the same order so the ranking and its ties are the same, less the terms that are 0.0
    # for every candidate (no IDC, no location: x + 0.0 == x); the candidate's index breaks a
    # tie of the rest, as the stable sort by them did, so the keys sort as plain tuples.
    # W_LOCATION times the affinity of the requester's location to each candidate's: a dict
    # lookup a candidate (an lru_cache call, its key a new tuple, was a sixth of a decision).
    terms = _location_terms(location) if location else None
    keyed = []
    for i, c in enumerate(candidates):
        uploads, handouts = float(c.active_uploads), c.handouts
        held = handouts if handouts > uploads else uploads  # load(c): max, the first if equal
        slots = c.upload_slots
        score = W_LOAD * (1.0 - held / (slots if slots > 1 else 1))
        if idc and c.idc == idc:
            score += W_IDC
        if terms is not None:
            term = terms.get(c.location)
            if term is None:
                if len(terms) >= _LOCATION_TERMS_MAX:
                    terms.clear()
                term = terms[c.location] = W_LOCATION * location_affinity(location, c.location)
            score += term
        keyed.append((held >= slots, -(score + W_COMPLETE * c.complete + W_SEED * c.seed),
                      rand(), i))
    keyed.sort()  # no free slot last, then the best score, then at random
    return [candidates[t[3]] for t in keyed[:limit]]


def slow(rate: float, best: float) -> bool:
    """Whether a holder uploading at `rate` (bytes/s; 0.0: not known) is slow beside `best`
    (one that finished no upload over a whole interval: ClusterState's STALLED_RATE)."""
    return 0.0 < rate < SLOW_SHARE * best


_RATE = operator.attrgetter("upload_rate")
