"""The Redis store's caches of decoded state (records.PeerCache, loader.HolderCache, the lease
tables), as pure cores: what a cached entry hands the rules is fresh, and a raw value that
changed is decoded anew."""

from __future__ import annotations

from common.models import PeerLoad, PeerRegistration
from scheduler.redis import records
from scheduler.redis.loader import HolderCache, LoadedHolders
from scheduler.state import Lease, PeerState


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


def test_holders_fields_decoded_once_and_shared_while_equal() -> None:
    cache = HolderCache(least=0)
    first = cache.get("t", 0, "a,b|c=1.0")
    assert (first.base, first.legacy, sorted(first.order)) == ({"a", "b"}, "c=1.0", ["a", "b"])
    assert cache.get("t", 0, "a,b|c=1.0") is first
    assert cache.get("t", 1, "a,b|c=1.0") is first  # another piece, the same field
    changed = cache.get("t", 0, "a,b,d")
    assert changed.base == {"a", "b", "d"} and not changed.legacy
    assert cache.get("t", 1, "a,b|c=1.0") is first


def test_holders_cache_bounded_by_the_ids_it_keeps() -> None:
    cache = HolderCache(limit=5, least=0)
    cache.get("t", 0, "a,b,c")
    cache.get("t", 1, "d,e")
    cache.get("t", 2, "d,e")  # shared: no more ids kept
    assert cache.size == 5 and len(cache.sets) == 2
    cache.get("t", 1, "d,e,f")  # the field changed: the old set still serves piece 2
    assert cache.size <= 5 and list(cache.pieces) == [("t", 2), ("t", 1)]
    cache.get("t", 2, "x")  # piece 2's last user of "d,e" gone: forgotten
    assert set(cache.sets) == {"d,e,f", "x"} and cache.size == 4


def test_fields_of_few_holders_are_decoded_not_kept() -> None:
    cache = HolderCache(least=2)
    small = cache.get("t", 0, "a,b")
    assert small.base == {"a", "b"} and not cache.pieces
    assert cache.get("t", 1, "a,b,c").base == {"a", "b", "c"} and list(cache.pieces) == [("t", 1)]
    cache.joined("t", 0, small, frozenset({"c"}))  # now three: kept
    assert cache.pieces[("t", 0)].raw == "a,b,c"


def test_loaded_holders_know_whether_a_rule_changed_them() -> None:
    loaded = HolderCache().get("t", 0, "a,b")
    holders = LoadedHolders(loaded)
    assert holders == {"a", "b"} and holders.unchanged() is loaded
    holders.discard("z")  # a mutator, even one that changes nothing: compared then
    assert holders.unchanged() is None
    again = LoadedHolders(loaded)
    again |= {"c"}
    assert again.unchanged() is None and loaded.base == {"a", "b"}


def test_append_holders_keeps_an_earlier_layouts_children_last() -> None:
    assert records.append_holders("a,b", "c") == "a,b,c"
    assert records.append_holders("a|x=1.0", "c,d") == "a,c,d|x=1.0"
    assert records.append_holders("|x=1.0", "c") == "c|x=1.0"
    assert records.append_holders("", "c") == "c"
    assert records.decode_holders(records.append_holders("a|x=1.0", "c")) == \
        ({"a", "c"}, "x=1.0")


def test_a_holders_fields_version_is_kept_with_it_and_only_with_it() -> None:
    """An entry's version (what Redis vouched for with the field) is what a read sends
    instead of fetching the field: kept while the field is, gone with a field read without
    one, and with an entry evicted."""
    cache = HolderCache(limit=5, least=0, versioned=0)
    first = cache.get("t", 0, "a,b", ("1.0", "7"))
    assert cache.cached("t", 0) == (first, ("1.0", "7"))
    assert cache.get("t", 0, "a,b") is first and cache.cached("t", 0) == (first, ("1.0", "7"))
    cache.get("t", 0, "a,b,c")  # changed, read without a version: none known
    assert cache.cached("t", 0) is not None and cache.cached("t", 0)[1] is None
    cache.joined("t", 0, cache.pieces[("t", 0)], frozenset({"d"}), ("1.0", "9"))
    assert cache.cached("t", 0)[1] == ("1.0", "9") and cache.pieces[("t", 0)].raw == "a,b,c,d"
    cache.vouched("t", 0, first, ("1.0", "10"))  # not the entry's set any more: ignored
    assert cache.cached("t", 0)[1] == ("1.0", "9")
    cache.vouched("t", 0, cache.pieces[("t", 0)], ("1.0", "10"))
    assert cache.cached("t", 0)[1] == ("1.0", "10")
    cache.get("t", 1, "x,y", ("1.0", "9"))  # 6 ids: the oldest entry goes, with its version
    assert cache.cached("t", 0) is None and ("t", 0) not in cache.seqs
    short = HolderCache(least=0)  # a field under `versioned` bytes: read again, not checked
    short.get("t", 0, "a,b", ("1.0", "7"))
    assert short.pieces and short.cached("t", 0) is None


def _lease_table() -> dict[int, Lease]:
    a = Lease(holder="a", epoch=1, first=0, last=3, progress_at=10.5)
    b = Lease(holder="b", epoch=2, first=8, last=8, progress_at=11.25)
    return {0: a, 1: a, 3: a, 8: b}  # a's run no longer covers 2


def test_a_loaded_lease_table_decodes_the_runs_it_is_asked_for() -> None:
    raw = records.encode_leases(_lease_table())
    t = records.LoadedLeases(records.LeaseRows(raw))
    assert t.get(8) == _lease_table()[8] and t.get(2) is None and 5 not in t
    assert dict.__len__(t) == 1  # only b's run decoded
    assert t[1] is t[0] is t.get(3)  # one object per run, as the rules keep them
    assert t.unchanged()
    assert t == _lease_table() and len(t) == 4 and sorted(t) == [0, 1, 3, 8]
    assert records.encode_leases(t) == raw == records.encode_leases(records.decode_leases(raw))


def test_a_loaded_lease_table_knows_whether_the_rules_changed_it() -> None:
    raw = records.encode_leases(_lease_table())

    def fresh() -> records.LoadedLeases:
        return records.LoadedLeases(records.LeaseRows(raw))
    t = fresh()
    assert t.pop(5, None) is None and t.unchanged()  # nothing there: nothing changed
    t.pop(1)
    assert not t.unchanged() and 0 in t and 1 not in t
    t = fresh()
    t[0].progress_at = 12.0  # a holder's progress, in place
    assert not t.unchanged()
    t = fresh()
    t[9] = Lease(holder="c", epoch=3, first=9, last=9, progress_at=12.0)
    assert not t.unchanged() and len(t) == 5
    t = fresh()
    for lease in t.values():  # read whole, left alone
        assert lease.holder in "ab"
    assert t.unchanged()
    t.clear()
    assert not t.unchanged() and not t and records.encode_leases(t) == ""


def test_parsed_lease_fields_are_kept_while_the_field_is_the_same() -> None:
    cache = records.LeaseCache()
    raw = records.encode_leases(_lease_table())
    rows = cache.get("t", raw)
    assert cache.get("t", raw) is rows and cache.get("u", raw) is not rows
    assert cache.get("t", "").rows == [] and cache.get("t", raw) is not rows
