"""The Redis store's caches of decoded state (scheduler/redis/records.py), as pure cores: what a
cached entry hands the rules is a fresh record, and a raw value that changed is decoded anew."""

from __future__ import annotations

from common.models import PeerLoad, PeerRegistration
from scheduler.redis import records
from scheduler.state import PeerState


def raw(peer: PeerState) -> list[str | None]:
    """A peer's hash as HMGET reads it back, in PEER_NAMES order."""
    h = records.peer_hash(peer)
    fields = dict(zip(h[::2], h[1::2], strict=True))
    return [fields[n] for n in records.PEER_NAMES]


def peer(pid: str = "a", last_seen: float = 1.0, active: int = 0) -> PeerState:
    return PeerState(reg=PeerRegistration(id=pid, upload_addr="10.0.0.1:65002"),
                     registered_at=0.5, last_seen=last_seen,
                     load=PeerLoad(active_uploads=active))


def test_a_hit_is_a_fresh_copy_the_rules_may_change() -> None:
    cache = records.PeerCache()
    stored = raw(peer())
    first, values = cache.get("a", stored, False)
    first.last_seen = 99.0
    first.tasks.add("t")
    first.load = PeerLoad(active_uploads=5)
    again, values2 = cache.get("a", stored, False)
    assert again is not first
    assert (again.last_seen, again.tasks, again.load.active_uploads) == (1.0, set(), 0)
    assert values2 == values == records.peer_values(again)
    assert again.reg is first.reg  # decoded once


def test_a_changed_raw_record_or_cordon_is_decoded_anew() -> None:
    cache = records.PeerCache()
    cache.get("a", raw(peer()), False)
    later, values = cache.get("a", raw(peer(last_seen=2.0, active=3)), False)
    assert (later.last_seen, later.load.active_uploads, later.cordoned) == (2.0, 3, False)
    assert values == records.peer_values(later)
    cordoned, _ = cache.get("a", raw(peer(last_seen=2.0, active=3)), True)
    assert cordoned.cordoned


def test_an_incomplete_record_is_absent() -> None:
    cache = records.PeerCache()
    stored = raw(peer())
    stored[2] = None
    assert cache.get("a", stored, False) is None


def test_caches_the_rules_built_carry_to_the_next_copy() -> None:
    cache = records.PeerCache()
    stored = raw(peer())
    first, _ = cache.get("a", stored, False)
    first.refs = (first.reg, {})
    again, _ = cache.get("a", stored, False)
    assert again.refs is first.refs


def test_bounded() -> None:
    cache = records.PeerCache(limit=2)
    for pid in "abc":
        cache.get(pid, raw(peer(pid)), False)
    assert len(cache.entries) <= 2
