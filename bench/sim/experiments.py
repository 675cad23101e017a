"""Rule changes tried in the simulation without editing the rules: each patches the real
module in this process only, so a before/after is the same code with one change."""

from __future__ import annotations

import random

import scheduler.policy
import scheduler.state

_rank = scheduler.policy.rank_parents


def _idc_local(candidates: list[scheduler.policy.Candidate], idc: str, location: str,
               limit: int, rng: random.Random | None = None) -> list[scheduler.policy.Candidate]:
    """Holders in the requester's IDC only, whenever there is one (busy or not): a piece
    crosses into an IDC about once and spreads inside it as a tree."""
    local = [c for c in candidates if idc and c.idc == idc]
    return _rank(local or candidates, idc, location, limit, rng)


def idc_local() -> None:
    scheduler.policy.rank_parents = _idc_local


def children(n: int) -> None:
    scheduler.state.CHILDREN_PER_HOLDER = n


EXPERIMENTS = {"idc-local": idc_local}
