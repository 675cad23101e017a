"""Unit tests for scheduler/state.py: the scheduler's rules, driven with an explicit clock."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import scheduler.state
from common.models import (
    Announce,
    Decision,
    Heartbeat,
    LeaseProgress,
    PeerCounters,
    PeerLoad,
    PeerRegistration,
    PieceClaim,
    Report,
    ScheduleRequest,
    TaskRequest,
    Withdraw,
)
from common.pieces import MiB
from scheduler import policy
from scheduler.state import (
    CHILDREN_PER_HOLDER,
    HOLDER_SAMPLE,
    LEASE_SPREAD,
    MAX_LEASE_PIECES,
    PARENTS_PER_PIECE,
    PENALTY_SECONDS,
    RESET_EVERY,
    SUSPECT_LEASE_QUIET,
    Children,
    ClusterState,
    Conflict,
    PieceState,
    StateError,
    UnknownPeer,
    UnknownTask,
)

TASK = "sha256:" + "a" * 64
URL_TASK = "url:" + "b" * 64
HB = 2.0  # heartbeat interval
LEASE = 2.0  # lease timeout


def chunk(n: int) -> str:
    return f"blake3:{n:064x}"


class Cluster:
    """ClusterState plus terse helpers; every call names its `now`."""

    def __init__(self, *, heartbeat_interval: float = HB, lease_timeout: float = LEASE,
                 seed: int = 0) -> None:
        self.s = ClusterState(heartbeat_interval=heartbeat_interval, lease_timeout=lease_timeout,
                              rng=random.Random(seed))
        self._n = 0

    def peer(self, pid: str, now: float = 0.0, **kw: object) -> None:
        self._n += 1
        kw.setdefault("upload_addr", f"10.0.{self._n // 250}.{self._n % 250 + 1}:65002")
        self.s.register(PeerRegistration(id=pid, **kw), now)

    def task(self, pieces: int = 8, task_id: str = TASK, piece_size: int = MiB) -> None:
        self.s.ensure_task(TaskRequest(task_id=task_id, length=pieces * piece_size,
                                       piece_size=piece_size), 0.0)

    def schedule(self, pid: str, pieces: Iterable[int], now: float, exclude: Iterable[str] = (),
                 task_id: str = TASK, registry: str | None = None) -> list[Decision]:
        return self.s.schedule(ScheduleRequest(peer_id=pid, task_id=task_id, pieces=list(pieces),
                                               exclude=list(exclude), registry=registry), now)

    def one(self, pid: str, piece: int, now: float, **kw: object) -> Decision:
        (d,) = self.schedule(pid, [piece], now, **kw)
        return d

    def announce(self, pid: str, pieces: dict[int, str] | Iterable[int], now: float, *,
                 sealed: bool = False, progress: Iterable[int] = (), task_id: str = TASK,
                 registry: str | None = None):
        claims = pieces.items() if isinstance(pieces, dict) else ((i, chunk(i)) for i in pieces)
        return self.s.announce(Announce(
            peer_id=pid, task_id=task_id, sealed=sealed, registry=registry,
            pieces=[PieceClaim(index=i, chunk=c) for i, c in claims],
            progress=[LeaseProgress(epoch=e) for e in progress]), now)

    def heartbeat(self, pid: str, now: float, *, started_at: float = 1.0, active: int = 0,
                  **counters: int) -> None:
        self.s.heartbeat(pid, Heartbeat(load=PeerLoad(active_uploads=active),
                                        counters=PeerCounters(started_at=started_at,
                                                              **counters)), now)

    def report(self, pid: str, parent: str, kind: str, now: float, piece: int | None = None
               ) -> None:
        self.s.report(Report(peer_id=pid, parent_id=parent, task_id=TASK, piece=piece,
                             kind=kind), now)

    def parents(self, pid: str, piece: int, now: float, **kw: object) -> list[str]:
        d = self.one(pid, piece, now, **kw)
        return [p.id for p in d.parents] if d.action == "parents" else []

    def holders(self, piece: int, task_id: str = TASK) -> set[str]:
        p = self.s.tasks[task_id].pieces.get(piece)
        return set(p.holders) if p else set()


@pytest.fixture
def c() -> Cluster:
    cl = Cluster()
    for pid in ("A", "B", "C", "D"):
        cl.peer(pid)
    cl.task()
    return cl


@pytest.fixture
def two_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """A children's share of two per holder (CHILDREN_PER_HOLDER's default): the tests that
    use it count places in the share; the rule is the same for any share."""
    import scheduler.state
    monkeypatch.setattr(scheduler.state, "CHILDREN_PER_HOLDER", 2)


@pytest.fixture
def lease_idc(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's leases kept in one IDC (LEASE_IDC, off by default, on with SPREAD_IDC)."""
    import scheduler.state
    monkeypatch.setattr(scheduler.state, "LEASE_IDC", True)


@pytest.fixture
def one_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """A share of one child per holder (bench.sim's `--children 1`, tried as the default in
    stop 22 and kept at two for its cost in scheduler waits)."""
    import scheduler.state
    monkeypatch.setattr(scheduler.state, "CHILDREN_PER_HOLDER", 1)


def _uploads_at(cl: Cluster, pid: str, rate: float, now: float) -> None:
    """Two heartbeats with uploads running through the interval: `rate` bytes/s seen."""
    cl.heartbeat(pid, now, active=1, uploaded=0)
    cl.heartbeat(pid, now + 0.01, active=1, uploaded=int(rate * HB))


# --- registration -----------------------------------------------------------------------------

def test_register_new_peer() -> None:
    cl = Cluster()
    cl.peer("A", 5.0, idc="i1", location="a|b", upload_slots=3, seed=True)
    p = cl.s.peers["A"]
    assert (p.registered_at, p.last_seen) == (5.0, 5.0)
    assert (p.reg.idc, p.reg.location, p.reg.upload_slots, p.reg.seed) == ("i1", "a|b", 3, True)
    assert not p.cordoned and not p.penalised(5.0)


def test_reregistration_updates_and_keeps_holdings(c: Cluster) -> None:
    c.announce("A", [0], 1.0)
    before = c.s.peers["A"]
    c.s.register(PeerRegistration(id="A", upload_addr="192.168.1.9:7000", idc="new"), 3.0)
    after = c.s.peers["A"]
    assert after is before
    assert after.registered_at == 0.0
    assert after.last_seen == 3.0
    assert after.reg.idc == "new"
    assert c.holders(0) == {"A"}
    d = c.one("B", 0, 3.0)
    assert d.action == "parents"
    assert [(p.id, p.addr) for p in d.parents] == [("A", "192.168.1.9:7000")]


def test_heartbeat_unknown_peer(c: Cluster) -> None:
    with pytest.raises(UnknownPeer):
        c.heartbeat("nobody", 1.0)


def test_heartbeat_records_load_and_liveness(c: Cluster) -> None:
    c.heartbeat("A", 4.0, active=3)
    assert c.s.peers["A"].last_seen == 4.0
    assert c.s.peers["A"].load.active_uploads == 3


def test_leave_unknown_peer(c: Cluster) -> None:
    with pytest.raises(UnknownPeer):
        c.s.leave("nobody")


def test_leave_drops_holdings(c: Cluster) -> None:
    c.announce("A", [0, 1], 0.0)
    c.s.leave("A")
    assert "A" not in c.s.peers
    assert c.holders(0) == set() and c.holders(1) == set()
    assert c.one("B", 0, 0.1).action == "source"


# --- tasks ------------------------------------------------------------------------------------

def test_ensure_task_defaults_and_conflict() -> None:
    cl = Cluster()
    meta = cl.s.ensure_task(TaskRequest(task_id=TASK, length=3 * (1 << 30)), 0.0)
    assert meta.piece_size == 4 * MiB  # default_piece_size
    assert meta.digest == TASK
    assert not meta.sealed
    # a later request cannot change the piece size; a different length is a conflict
    again = cl.s.ensure_task(TaskRequest(task_id=TASK, length=3 * (1 << 30),
                                         piece_size=64 * 1024), 1.0)
    assert again == meta
    with pytest.raises(Conflict):
        cl.s.ensure_task(TaskRequest(task_id=TASK, length=5), 1.0)
    url = cl.s.ensure_task(TaskRequest(task_id=URL_TASK, length=10, piece_size=64 * 1024), 0.0)
    assert url.piece_size == 64 * 1024
    assert url.digest is None
    assert Conflict.status == 409 and UnknownPeer.status == UnknownTask.status == 404


# --- announce ---------------------------------------------------------------------------------

def test_announce_accepts_and_records_holders(c: Cluster) -> None:
    reply = c.announce("A", [0, 1, 2], 1.0)
    assert reply.accepted == 3 and reply.rejected == []
    reply = c.announce("B", [1], 1.0)
    assert reply.accepted == 1
    assert c.holders(1) == {"A", "B"}
    assert c.s.tasks[TASK].held == {"A": 3, "B": 1}
    assert c.s.peers["A"].last_seen == 1.0
    assert not c.s.peers["A"].penalised(1.0)


def test_announce_same_piece_twice_counts_once(c: Cluster) -> None:
    c.announce("A", [0], 1.0)
    c.announce("A", [0], 2.0)
    assert c.s.tasks[TASK].held["A"] == 1


def test_announce_index_out_of_range(c: Cluster) -> None:
    reply = c.announce("A", [0, 8, 100], 1.0)
    assert reply.accepted == 1
    assert reply.rejected == [8, 100]
    assert c.holders(0) == {"A"}
    assert 8 not in c.s.tasks[TASK].pieces
    assert c.s.peers["A"].penalised(1.0)


def test_announce_unknown_peer_or_task(c: Cluster) -> None:
    with pytest.raises(UnknownPeer):
        c.announce("nobody", [0], 1.0)
    with pytest.raises(UnknownTask):
        c.announce("A", [0], 1.0, task_id=URL_TASK)


def test_conflicting_chunk_on_provisional_map_rejected_and_penalised(c: Cluster) -> None:
    c.announce("A", {0: chunk(100)}, 1.0)
    reply = c.announce("B", {0: chunk(999), 1: chunk(1)}, 2.0)
    assert reply.rejected == [0]
    assert reply.accepted == 1
    assert c.s.tasks[TASK].pieces[0].chunk == chunk(100)
    assert c.holders(0) == {"A"}
    b = c.s.peers["B"]
    assert b.penalty_reason == "conflict"
    assert b.penalty_until == 2.0 + PENALTY_SECONDS["conflict"]
    # the flagged peer is not handed out, even for the piece it did hold honestly
    assert c.one("C", 1, 3.0).action != "parents"
    assert c.parents("C", 1, 2.0 + PENALTY_SECONDS["conflict"]) == ["B"]


def test_one_sealed_announcement_is_not_a_seal(c: Cluster) -> None:
    # A forged seal: one member announces chunk ids of its own choosing as proven.
    reply = c.announce("A", range(8), 1.0, sealed=True)
    assert reply.rejected == []
    task = c.s.tasks[TASK]
    assert not task.meta.sealed
    assert task.trust.confirmed == ("A",)
    c.announce("A", [], 2.0, sealed=True)  # saying it again is not a second confirmation
    assert not c.s.tasks[TASK].meta.sealed


def test_two_confirmations_seal(c: Cluster) -> None:
    c.announce("A", range(8), 1.0)
    c.announce("B", range(8), 2.0, sealed=True)
    assert not c.s.tasks[TASK].meta.sealed
    c.announce("A", [], 3.0, sealed=True)  # the flag alone, once it holds every piece
    task = c.s.tasks[TASK]
    assert task.meta.sealed and task.trust.confirmed == ("A", "B")
    assert c.s.task_view(task, detail=False)["sealed"] is True


def test_sealed_without_all_pieces_does_not_confirm(c: Cluster) -> None:
    c.announce("A", range(7), 1.0, sealed=True)
    c.announce("B", range(7), 1.0, sealed=True)
    assert c.s.tasks[TASK].trust.confirmed == ()
    assert not c.s.tasks[TASK].meta.sealed


def test_sealed_with_a_rejected_claim_does_not_confirm(c: Cluster) -> None:
    reply = c.announce("A", [*range(8), 9], 1.0, sealed=True)
    assert reply.rejected == [9]
    assert c.s.tasks[TASK].trust.confirmed == ()


def test_conflicting_sealed_claim_never_overrides_a_provisional_map(c: Cluster) -> None:
    c.announce("A", range(8), 1.0)  # the lease holder's honest map
    forged = {i: chunk(500 + i) for i in range(8)}
    reply = c.announce("D", forged, 2.0, sealed=True)
    assert sorted(reply.rejected) == list(range(8)) and reply.accepted == 0
    task = c.s.tasks[TASK]
    assert [task.pieces[i].chunk for i in range(8)] == [chunk(i) for i in range(8)]
    assert c.holders(0) == {"A"} and task.trust.confirmed == ()
    x = c.s.peers["D"]
    assert x.penalty_reason == "conflict" and x.penalised(2.0)
    assert c.parents("C", 0, 2.0) == ["A"]


def test_conflict_against_sealed_map_rejected_even_if_sealed(c: Cluster) -> None:
    c.announce("A", range(8), 1.0, sealed=True)
    c.announce("B", range(8), 1.0, sealed=True)
    assert c.s.tasks[TASK].meta.sealed
    reply = c.announce("C", {0: chunk(777)}, 2.0, sealed=True)
    assert reply.rejected == [0]
    assert c.s.tasks[TASK].pieces[0].chunk == chunk(0)
    assert c.s.peers["C"].penalised(2.0)
    assert c.holders(0) == {"A", "B"}


def test_authors_are_the_peers_that_first_set_chunk_ids(c: Cluster) -> None:
    c.announce("A", range(4), 1.0)
    c.announce("B", range(8), 1.0)  # agrees on 0-3, authors 4-7
    c.announce("C", range(8), 1.0)  # only agrees
    assert c.s.tasks[TASK].trust.authors == ("A", "B")


def test_lease_holder_sets_the_provisional_chunk(c: Cluster) -> None:
    assert c.one("A", 0, 0.0).action == "source"  # A fetches piece 0 under the lease
    c.announce("B", {0: chunk(666)}, 0.5)  # B never fetched it under a lease
    reply = c.announce("A", {0: chunk(0)}, 1.0)
    assert reply.rejected == []
    assert not c.s.peers["A"].penalised(1.0)
    assert c.s.tasks[TASK].pieces[0].chunk == chunk(0)


def test_a_claim_under_anothers_live_lease_is_deferred_not_rejected(c: Cluster) -> None:
    assert c.one("A", 0, 0.0).action == "source"  # A holds piece 0's lease
    # B fetched piece 0 on the on-demand path meanwhile: not recorded, not blamed.
    reply = c.announce("B", {0: chunk(0), 1: chunk(1)}, 0.5)
    assert (reply.accepted, reply.rejected, reply.deferred) == (1, [], [0])
    assert c.holders(0) == set() and not c.s.peers["B"].penalised(0.5)
    # The lease resolves (its holder announces the same bytes): B's claim again is recorded.
    assert c.announce("A", {0: chunk(0)}, 1.0).accepted == 1
    again = c.announce("B", {0: chunk(0)}, 1.1)
    assert (again.accepted, again.rejected, again.deferred) == (1, [], [])
    assert c.holders(0) == {"A", "B"}
    # A claim that contradicts the map is refused and its maker penalised: rejected.
    wrong = c.announce("C", {0: chunk(666)}, 1.2)
    assert (wrong.rejected, wrong.deferred) == ([0], []) and c.s.peers["C"].penalised(1.2)


def test_a_claim_deferred_under_a_lease_that_lapses_is_recorded_on_retry(c: Cluster) -> None:
    assert c.one("A", 0, 0.0).action == "source"
    assert c.announce("B", {0: chunk(0)}, 0.5).deferred == [0]
    # A makes no progress: past the lease timeout B's claim is no longer held back.
    assert c.announce("B", {0: chunk(0)}, LEASE + 0.1).accepted == 1
    assert c.holders(0) == {"B"} and c.s.tasks[TASK].pieces[0].chunk == chunk(0)


# --- schedule: origin leases ------------------------------------------------------------------

def test_a_lease_of_a_holder_reported_down_lapses_without_its_progress(c: Cluster) -> None:
    """A child found the lease holder down or silent (a penalty): once the lease's progress is
    SUSPECT_LEASE_QUIET old it is taken over, not after the whole lease timeout; a holder
    falsely reported that still reports progress keeps it."""
    assert SUSPECT_LEASE_QUIET < LEASE
    assert c.one("A", 0, 0.0).action == "source"
    assert c.one("C", 1, 0.0).action == "source"
    c.report("B", "A", "failed", 0.1)
    c.report("B", "C", "slow", 0.1)
    c.announce("C", {}, 0.5, progress=[c.s.tasks[TASK].leases[1].epoch])  # C is alive
    assert c.one("D", 0, SUSPECT_LEASE_QUIET - 0.01).action == "wait"
    later = SUSPECT_LEASE_QUIET + 0.01
    taken = c.one("D", 0, later)
    assert (taken.action, taken.reason) == ("source", "lease-expired")
    assert c.one("D", 1, later).action == "wait"  # C's progress is 0.26 s old


def test_a_lease_of_a_holder_not_reported_lasts_the_lease_timeout(c: Cluster) -> None:
    assert c.one("A", 0, 0.0).action == "source"
    assert c.one("D", 0, LEASE - 0.01).action == "wait"
    assert c.one("D", 0, LEASE + 0.01).reason == "lease-expired"


def test_first_requester_gets_a_source_lease_over_a_run(c: Cluster) -> None:
    ds = c.schedule("A", range(6), 0.0)
    assert [d.piece for d in ds] == list(range(6))
    assert {d.action for d in ds} == {"source"}
    assert {d.reason for d in ds} == {"new-task"}
    assert len({d.epoch for d in ds}) == 1
    assert {(d.first, d.last) for d in ds} == {(0, 5)}
    assert c.s.back_to_source == 1


def test_lease_runs_are_capped(c: Cluster) -> None:
    cl = Cluster()
    cl.peer("A")
    n = 2 * MAX_LEASE_PIECES + 8
    cl.task(pieces=n)
    ds = cl.schedule("A", range(n), 0.0)
    assert all(d.action == "source" for d in ds)
    bounds = sorted({(d.first, d.last) for d in ds})
    m = MAX_LEASE_PIECES
    assert bounds == [(0, m - 1), (m, 2 * m - 1), (2 * m, n - 1)]
    epochs = [ds[0].epoch, ds[m].epoch, ds[2 * m].epoch]
    assert epochs == sorted(set(epochs)), "one new, higher epoch per run"
    for d in ds:
        assert d.first <= d.piece <= d.last
        assert d.epoch == ds[d.first].epoch
    assert cl.s.back_to_source == 3


def test_lease_runs_are_capped_by_bytes() -> None:
    cl = Cluster()
    cl.peer("A")
    cl.task(pieces=10, piece_size=32 * MiB)  # 64 MiB per run: two pieces
    ds = cl.schedule("A", range(10), 0.0)
    assert sorted({(d.first, d.last) for d in ds}) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


def test_non_consecutive_pieces_get_separate_runs(c: Cluster) -> None:
    ds = c.schedule("A", [5, 0, 1, 6, 1], 0.0)
    assert [d.piece for d in ds] == [5, 0, 1, 6]  # request order, duplicates once
    assert {d.piece: (d.first, d.last) for d in ds} == {5: (5, 5), 0: (0, 1), 1: (0, 1),
                                                       6: (6, 6)}
    assert len({d.epoch for d in ds}) == 3


def test_second_requester_waits_single_flight(c: Cluster) -> None:
    c.schedule("A", range(4), 0.0)
    for pid in ("B", "C", "D"):
        ds = c.schedule(pid, range(4), 0.5)
        assert [d.action for d in ds] == ["wait"] * 4
        assert all(d.epoch is None and not d.parents for d in ds)
    assert c.s.back_to_source == 1


def test_partial_overlap_waits_for_leased_and_leases_the_rest(c: Cluster) -> None:
    first = c.schedule("A", range(4), 0.0)
    ds = c.schedule("B", range(2, 6), 0.5)
    assert [d.action for d in ds] == ["wait", "wait", "source", "source"]
    assert ds[2].reason == ds[3].reason == "no-holder"
    assert (ds[2].first, ds[2].last) == (4, 5)
    assert ds[2].epoch > first[0].epoch


SPREAD = MAX_LEASE_PIECES // LEASE_SPREAD  # pieces a requester may hold leased in a crowd


def _crowd(n: int = 3 * MAX_LEASE_PIECES, **reg: object) -> Cluster:
    """A task others take part in: X and Y hold piece 0; A, B and C, whose uploads are known
    to go well, ask the rest."""
    cl = Cluster()
    for pid in ("X", "Y", "A", "B", "C"):
        cl.peer(pid, **reg)
        _uploads_at(cl, pid, 10e6, 0.0)
    cl.task(pieces=n)
    cl.schedule("X", [0], 0.0)
    cl.announce("X", [0], 0.1)
    cl.announce("Y", [0], 0.1)
    return cl


def test_crowd_leases_are_spread_over_requesters() -> None:
    """Everyone asks the same window: each requester leases a run's 1/LEASE_SPREAD, so the
    origin sends at several points of it at once (not one lease holder's downlink)."""
    cl = _crowd()
    window = range(1, 1 + MAX_LEASE_PIECES)
    a = cl.schedule("A", window, 1.0)
    assert [d.action for d in a] == ["source"] * SPREAD + ["wait"] * (MAX_LEASE_PIECES - SPREAD)
    assert {(d.first, d.last) for d in a[:SPREAD]} == {(1, SPREAD)}
    assert {d.reason for d in a[SPREAD:]} == {"lease-spread"}
    b = cl.schedule("B", window, 1.1)
    assert [d.action for d in b[:SPREAD]] == ["wait"] * SPREAD  # A's lease
    assert {(d.first, d.last) for d in b[SPREAD:2 * SPREAD]} == {(1 + SPREAD, 2 * SPREAD)}
    assert {d.action for d in b[SPREAD:2 * SPREAD]} == {"source"}
    assert {d.reason for d in b[2 * SPREAD:]} == {"lease-spread"}
    # A asking again keeps its own lease and still may take no more.
    again = cl.schedule("A", window, 1.2)
    assert [d.reason for d in again[:SPREAD]] == ["lease"] * SPREAD
    assert {d.reason for d in again[2 * SPREAD:]} == {"lease-spread"}


def test_a_spread_lease_holder_leases_again_as_its_pieces_land() -> None:
    cl = _crowd()
    window = range(1, 1 + MAX_LEASE_PIECES)
    cl.schedule("A", window, 1.0)
    cl.announce("A", [1, 2], 1.1)  # two of its leased pieces are held: room for two more
    ds = cl.schedule("A", range(3, 1 + MAX_LEASE_PIECES), 1.2)
    sources = [d.piece for d in ds if d.action == "source" and d.reason != "lease"]
    assert sources == [SPREAD + 1, SPREAD + 2]


def test_a_spread_lease_that_lapsed_frees_its_holders_room() -> None:
    cl = _crowd()
    cl.schedule("A", range(1, 1 + SPREAD), 1.0)
    ds = cl.schedule("A", range(1 + SPREAD, 1 + 2 * SPREAD), 1.0 + LEASE)  # own lease lapsed
    assert {d.action for d in ds} == {"source"}


def test_a_requester_not_known_to_upload_well_leaves_spread_leases_to_others() -> None:
    """It would be its leased pieces' only holder: while another leases, one whose uploads
    are slow beside the lease holders', or not measured beside a measured one, or that
    served corrupt bytes, waits (a slow first holder held the crowd back behind it, and
    leased on as it got ahead); one measured fine leases."""
    cl = _crowd()
    cl.peer("new")
    cl.peer("slow")
    _uploads_at(cl, "slow", 10e6 * policy.SLOW_SHARE / 2, 0.0)
    cl.peer("corrupt")
    _uploads_at(cl, "corrupt", 10e6, 0.0)
    cl.report("X", "corrupt", "corrupt", 0.5)
    cl.schedule("A", range(1, 1 + SPREAD), 1.0)  # another's live lease
    for pid in ("new", "slow", "corrupt"):
        ds = cl.schedule(pid, range(1 + SPREAD, 1 + 2 * SPREAD), 1.1)
        assert {(d.action, d.reason) for d in ds} == {("wait", "lease-spread")}
    assert {d.action for d in cl.schedule("B", range(1 + SPREAD, 1 + 2 * SPREAD), 1.2)} == {
        "source"}


def test_at_a_pulls_start_requesters_not_measured_lease_spread() -> None:
    """Nobody measured yet: no rate to go by, so an idle requester leases its share; one with
    uploads under way and no estimate yet does not."""
    cl = Cluster()
    for pid in ("A", "B", "C"):
        cl.peer(pid)
    cl.task(pieces=3 * MAX_LEASE_PIECES)
    cl.schedule("A", [0], 0.0)
    cl.announce("A", [0], 0.1)
    cl.schedule("A", range(1, 1 + SPREAD), 0.2)
    ds = cl.schedule("B", range(1 + SPREAD, 1 + 2 * SPREAD), 0.3)
    assert {d.action for d in ds} == {"source"}
    cl.heartbeat("C", 0.3, active=2)
    ds = cl.schedule("C", range(1 + 2 * SPREAD, 1 + 3 * SPREAD), 0.4)
    assert {(d.action, d.reason) for d in ds} == {("wait", "lease-spread")}


def test_with_nobody_leasing_a_slow_requester_still_leases() -> None:
    """No live lease elsewhere: someone must fetch what nobody holds, whatever its uplink."""
    cl = _crowd()
    cl.peer("slow")
    _uploads_at(cl, "slow", policy.STALLED_RATE, 0.0)
    ds = cl.schedule("slow", range(1, 1 + MAX_LEASE_PIECES), 1.0)
    assert [d.action for d in ds][:SPREAD] == ["source"] * SPREAD


def test_heartbeats_estimate_a_peers_upload_rate() -> None:
    """From the uploaded counter (peers report no rate): over an interval with uploads at
    both ends; stalled if none finished; kept over idle intervals; a new process starts
    unknown."""
    cl = Cluster()
    cl.peer("A")
    rate = lambda: cl.s.peers["A"].load.upload_rate  # noqa: E731
    cl.heartbeat("A", 0.0, active=0, uploaded=0)
    cl.heartbeat("A", 2.0, active=2, uploaded=MiB)  # began uploading within the interval
    assert rate() == 0.0
    cl.heartbeat("A", 4.0, active=1, uploaded=MiB + 8 * MiB)
    assert rate() == pytest.approx(8 * MiB / HB)
    cl.heartbeat("A", 6.0, active=0, uploaded=10 * MiB)
    assert rate() == pytest.approx(8 * MiB / HB)  # idle since: the estimate stands
    cl.heartbeat("A", 8.0, active=3, uploaded=10 * MiB)
    cl.heartbeat("A", 10.0, active=3, uploaded=10 * MiB)  # busy, nothing finished
    assert rate() == policy.STALLED_RATE
    cl.heartbeat("A", 12.0, active=3, uploaded=0, started_at=2.0)  # a new process
    assert rate() == 0.0


def test_a_rate_the_peer_reports_is_kept() -> None:
    cl = Cluster()
    cl.peer("A")
    cl.s.heartbeat("A", Heartbeat(load=PeerLoad(active_uploads=1, upload_rate=5.0),
                                  counters=PeerCounters(started_at=1.0, uploaded=0)), 0.0)
    cl.s.heartbeat("A", Heartbeat(load=PeerLoad(active_uploads=1, upload_rate=7.0),
                                  counters=PeerCounters(started_at=1.0, uploaded=MiB)), 2.0)
    assert cl.s.peers["A"].load.upload_rate == 7.0


def test_a_lone_reader_leases_whole_runs() -> None:
    """Nobody else holds or leases a piece: nobody else would lease the rest, so no spread."""
    cl = Cluster()
    cl.peer("A")
    cl.peer("B")  # registered, not taking part
    cl.task(pieces=2 * MAX_LEASE_PIECES)
    ds = cl.schedule("A", range(MAX_LEASE_PIECES), 0.0)
    assert {d.action for d in ds} == {"source"}
    cl.announce("A", [0], 0.1)
    ds = cl.schedule("A", range(MAX_LEASE_PIECES, 2 * MAX_LEASE_PIECES), 0.2)
    assert {(d.action, d.first, d.last) for d in ds} == {
        ("source", MAX_LEASE_PIECES, 2 * MAX_LEASE_PIECES - 1)}


def test_requesters_with_an_idc_lease_whole_runs() -> None:
    """Spread leases land in every IDC, and a piece leased outside the origin's crosses back
    into it: with IDC labels the runs stay whole."""
    cl = _crowd(idc="east")
    ds = cl.schedule("A", range(1, 1 + MAX_LEASE_PIECES), 1.0)
    assert {d.action for d in ds} == {"source"}


def _idcs() -> Cluster:
    """e1, e2 in east; w1 in west; n1 without a label; a task nobody holds a piece of."""
    cl = Cluster()
    for pid, idc in (("e1", "east"), ("e2", "east"), ("w1", "west"), ("n1", "")):
        cl.peer(pid, idc=idc)
    cl.task(pieces=4 * MAX_LEASE_PIECES)
    return cl


def test_while_one_idc_leases_a_requester_of_another_waits_for_its_copy(
        lease_idc: None) -> None:
    """LEASE_IDC: each piece leased outside the origin's IDC crosses into it as well as into
    every other, so a task's leases stay in the IDC that leases: west waits (`lease-idc`)
    for what nobody holds, east leases on; once east's lease lapses, west leases."""
    cl = _idcs()
    assert {d.action for d in cl.schedule("e1", range(4), 0.0)} == {"source"}
    later = range(MAX_LEASE_PIECES, MAX_LEASE_PIECES + 4)
    ds = cl.schedule("w1", later, 0.1)
    assert {(d.action, d.reason) for d in ds} == {("wait", "lease-idc")}
    assert cl.s.tasks[TASK].leases.keys() == set(range(4))
    assert {d.action for d in cl.schedule("e2", later, 0.2)} == {"source"}
    ds = cl.schedule("w1", range(2 * MAX_LEASE_PIECES, 2 * MAX_LEASE_PIECES + 4), 0.2 + LEASE)
    assert {d.action for d in ds} == {"source"}


def test_a_held_piece_still_crosses_and_an_unlabelled_peer_holds_nobody_back(
        lease_idc: None) -> None:
    """Only leases wait: a piece east holds is offered to west (its one crossing); a lease
    held by a peer without a label, or a requester without one, is not held back."""
    cl = _idcs()
    cl.schedule("e1", range(4), 0.0)
    cl.announce("e1", [0], 0.1)
    assert cl.one("w1", 0, 0.2).action == "parents"
    assert cl.one("n1", 8, 0.3).action == "source"  # beside east's live lease
    cl.s.tasks[TASK].leases.clear()
    cl.schedule("n1", [9], 0.4)
    assert cl.one("w1", 10, 0.5).action == "source"  # beside the unlabelled one's


def test_lease_idc_off_every_idc_leases() -> None:
    assert not scheduler.state.LEASE_IDC  # the default since stop 26
    cl = _idcs()
    cl.schedule("e1", range(4), 0.0)
    assert {d.action for d in cl.schedule("w1", range(8, 12), 0.1)} == {"source"}


def test_lease_holder_asking_again_keeps_its_lease(c: Cluster) -> None:
    first = c.schedule("A", range(4), 0.0)
    again = c.schedule("A", [1, 2], 1.0)
    assert [d.action for d in again] == ["source", "source"]
    assert {d.reason for d in again} == {"lease"}
    assert {d.epoch for d in again} == {first[0].epoch}
    assert {(d.first, d.last) for d in again} == {(0, 3)}
    assert c.s.back_to_source == 1


def test_requester_gets_parents_once_the_holder_announces(c: Cluster) -> None:
    c.schedule("A", range(4), 0.0)
    c.announce("A", [0], 0.5)
    ds = c.schedule("B", [0, 1], 0.6)
    assert ds[0].action == "parents"
    assert ds[0].chunk == chunk(0)
    assert [p.id for p in ds[0].parents] == ["A"]
    assert ds[0].parents[0].addr == c.s.peers["A"].reg.upload_addr
    assert ds[1].action == "wait"


def test_lease_expires_without_progress(c: Cluster) -> None:
    first = c.schedule("A", range(4), 0.0)
    c.announce("C", {7: chunk(7)}, 0.0)  # the task is not cold: someone holds something
    assert c.one("B", 1, LEASE - 0.01).action == "wait"
    ds = c.schedule("B", range(4), LEASE + 0.01)
    assert [d.action for d in ds] == ["source"] * 4
    assert {d.reason for d in ds} == {"lease-expired"}
    assert ds[0].epoch > first[0].epoch
    assert {(d.first, d.last) for d in ds} == {(0, 3)}
    # the old holder now waits for the new one
    assert c.one("A", 0, LEASE + 0.02).action == "wait"


def test_lease_takeover_reason_on_an_otherwise_cold_task(c: Cluster) -> None:
    first = c.one("A", 0, 0.0)
    d = c.one("B", 0, LEASE + 0.01)
    assert d.action == "source"
    assert d.epoch > first.epoch
    assert d.reason == "lease-expired"


def test_announced_piece_renews_the_rest_of_the_run(c: Cluster) -> None:
    c.schedule("A", range(4), 0.0)
    c.announce("A", [0], 1.5)
    assert c.one("B", 1, 3.0).action == "wait"  # 1.5 s since progress
    assert c.one("B", 1, 1.5 + LEASE + 0.01).action == "source"


def test_progress_epochs_keep_a_lease_alive(c: Cluster) -> None:
    (d,) = c.schedule("A", [0], 0.0)
    for t in (1.5, 3.0, 4.5):
        c.announce("A", [], t, progress=[d.epoch])
    assert c.one("B", 0, 6.0).action == "wait"
    assert c.s.tasks[TASK].pieces.get(0) is None
    taken = c.one("B", 0, 4.5 + LEASE + 0.01)
    assert taken.action == "source" and taken.epoch > d.epoch


def test_progress_for_another_epoch_or_from_another_peer_does_not_count(c: Cluster) -> None:
    (d,) = c.schedule("A", [0], 0.0)
    c.announce("A", [], 1.5, progress=[d.epoch + 100])
    c.announce("B", [], 1.5, progress=[d.epoch])
    assert c.one("C", 0, LEASE + 0.01).action == "source"


def test_lease_of_an_expired_peer_is_taken_over_at_once() -> None:
    cl = Cluster(heartbeat_interval=0.1, lease_timeout=60.0)
    cl.peer("A")
    cl.peer("B")
    cl.task()
    first = cl.one("A", 0, 0.0)
    assert cl.one("B", 0, 0.25).action == "wait"
    cl.heartbeat("B", 0.5)
    assert cl.s.expire(0.5) == ["A"]
    d = cl.one("B", 0, 0.5)  # long before the 60 s lease timeout
    assert d.action == "source" and d.epoch > first.epoch


def test_lease_of_a_peer_that_left_is_taken_over_at_once(c: Cluster) -> None:
    first = c.one("A", 0, 0.0)
    c.s.leave("A")
    d = c.one("B", 0, 0.1)
    assert d.action == "source" and d.epoch > first.epoch


@pytest.mark.usefixtures("two_children")
def test_excluded_holder_is_not_a_parent(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    assert c.parents("B", 0, 0.1) == ["A"]
    d = c.one("B", 0, 0.2, exclude=["A"])
    assert d.action == "source" and d.reason == "parents-unusable"
    assert c.parents("C", 0, 0.3) == ["A"]  # excluded for B only


def test_requester_is_never_its_own_parent(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    d = c.one("A", 0, 0.1)  # a holder asking for its own piece (e.g. lost from its store)
    assert d.action == "source" and d.reason == "parents-unusable"


def test_at_most_parents_per_piece(c: Cluster) -> None:
    for pid in "EFGH":
        c.peer(pid)
    c.announce("A", [0], 0.0)
    for pid in "BCEF":
        c.announce(pid, [0], 0.0)
    ps = c.parents("G", 0, 0.1)
    assert len(ps) == PARENTS_PER_PIECE == len(set(ps))
    assert "G" not in ps


@pytest.mark.parametrize(("call", "exc"), [
    (lambda cl: cl.schedule("nobody", [0], 0.0), UnknownPeer),
    (lambda cl: cl.schedule("A", [0], 0.0, task_id=URL_TASK), UnknownTask),
    (lambda cl: cl.schedule("A", [8], 0.0), StateError),
    (lambda cl: cl.schedule("A", [1 << 20], 0.0), StateError),
])
def test_schedule_errors(c: Cluster, call, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        call(c)


def test_out_of_range_piece_is_a_client_error(c: Cluster) -> None:
    with pytest.raises(StateError) as info:
        c.schedule("A", [8], 0.0)
    assert info.value.status == 400


def test_rejected_schedule_leaves_no_lease_behind(c: Cluster) -> None:
    with pytest.raises(StateError):
        c.schedule("A", [0, 1, 99], 0.0)
    assert c.s.back_to_source == 0
    assert c.one("B", 0, 0.1).action == "source"


def test_some_of_a_requests_pieces_are_decided_as_a_copy_with_only_those() -> None:
    """`schedule(req, now, pieces)`: a long poll decides again the pieces an announcement
    touched; the same decisions, leases and draws as a request for those pieces alone."""
    sides = []
    for subset in (True, False):
        c = Cluster()
        c.task()
        for pid in ("A", "B", "C"):
            c.peer(pid)
        c.announce("A", [0, 1], 0.0)
        req = ScheduleRequest(peer_id="B", task_id=TASK, pieces=[0, 1, 2, 3])
        picked = [3, 1]
        if subset:
            got = c.s.schedule(req, 0.5, picked)
        else:
            got = c.s.schedule(req.model_copy(update={"pieces": picked}), 0.5)
        sides.append((got, c.s.tasks[TASK].leases, c.s.rng.random()))
    assert sides[0] == sides[1]
    assert [d.piece for d in sides[0][0]] == [3, 1]
    assert [d.action for d in sides[0][0]] == ["source", "parents"]


# --- expiry -----------------------------------------------------------------------------------

def test_expire_after_three_heartbeat_intervals(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    for t in (0.0, 2.0, 4.0, 6.0, 8.0):
        c.heartbeat("B", t)
        c.heartbeat("C", t)
        c.heartbeat("D", t)
    assert c.s.expire(3 * HB - 0.01) == []
    assert c.parents("B", 0, 3 * HB - 0.01) == ["A"]
    assert c.s.expire(3 * HB + 0.01) == ["A"]
    assert "A" not in c.s.peers
    assert c.holders(0) == set()
    assert "A" not in c.s.tasks[TASK].held
    assert c.one("B", 0, 3 * HB + 0.02).action == "source"
    assert c.s.expire(3 * HB + 0.03) == []


@pytest.mark.parametrize("keepalive", ["heartbeat", "announce", "schedule", "register"])
def test_any_contact_keeps_a_peer_alive(c: Cluster, keepalive: str) -> None:
    c.announce("A", [0], 0.0)
    if keepalive == "heartbeat":
        c.heartbeat("A", 5.0)
    elif keepalive == "announce":
        c.announce("A", [1], 5.0)
    elif keepalive == "schedule":
        c.schedule("A", [2], 5.0)
    else:
        c.peer("A", 5.0)
    gone = c.s.expire(5.0 + 3 * HB - 0.01)
    assert "A" not in gone
    assert c.holders(0) == {"A"}
    assert "A" in c.s.expire(5.0 + 3 * HB + 0.01)


def test_expired_peer_comes_back_as_a_new_peer(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    c.s.expire(10.0)
    c.peer("A", 11.0)
    assert c.s.peers["A"].registered_at == 11.0
    assert c.holders(0) == set()


# --- reports and penalties --------------------------------------------------------------------

@pytest.mark.usefixtures("two_children")
@pytest.mark.parametrize("kind", ["failed", "slow", "corrupt"])
def test_report_penalises_the_parent_until_the_penalty_ends(c: Cluster, kind: str) -> None:
    c.announce("A", [0, 1], 0.0)
    c.announce("B", [0, 1], 0.0)
    c.report("C", "A", kind, 10.0)
    penalty = PENALTY_SECONDS[kind]
    assert c.s.peers["A"].penalty_reason == kind
    for t in (10.0, 10.0 + penalty / 2, 10.0 + penalty - 0.01):
        for pid in ("C", "D"):
            assert c.parents(pid, 1, t) == ["B"]
    assert "A" in c.parents("D", 1, 10.0 + penalty)
    view = c.s.peer_view(c.s.peers["A"], 10.0 + 1)
    assert view["penalised"] is True


def test_report_with_only_penalised_holders_goes_to_source(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    c.report("B", "A", "failed", 1.0)
    d = c.one("B", 0, 1.0)
    assert d.action == "source" and d.reason == "parents-unusable"


def test_corrupt_report_removes_the_holder_of_that_piece(c: Cluster) -> None:
    c.announce("A", [0, 1], 0.0)
    c.report("B", "A", "corrupt", 1.0, piece=0)
    assert c.holders(0) == set()
    assert c.holders(1) == {"A"}
    assert c.s.tasks[TASK].held["A"] == 1
    after = 1.0 + PENALTY_SECONDS["corrupt"]
    assert c.parents("C", 1, after) == ["A"]
    assert c.parents("C", 0, after) == []  # still not a holder of the corrupt piece


@pytest.mark.parametrize("kind", ["failed", "slow"])
def test_other_reports_keep_the_holder(c: Cluster, kind: str) -> None:
    c.announce("A", [0], 0.0)
    c.report("B", "A", kind, 1.0, piece=0)
    assert c.holders(0) == {"A"}


def test_a_shorter_penalty_does_not_cut_a_longer_one(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    c.report("B", "A", "corrupt", 1.0)
    c.report("B", "A", "failed", 2.0)
    assert c.s.peers["A"].penalty_until == 1.0 + PENALTY_SECONDS["corrupt"]
    assert c.parents("C", 0, 2.0 + PENALTY_SECONDS["failed"]) == []


def test_report_from_unknown_peer_or_about_unknown_parent(c: Cluster) -> None:
    with pytest.raises(UnknownPeer):
        c.report("nobody", "A", "failed", 1.0)
    c.report("A", "ghost", "corrupt", 1.0, piece=0)  # ignored
    assert not c.s.peers["A"].penalised(1.0)


# --- cordon -----------------------------------------------------------------------------------

def test_cordon_and_uncordon(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    c.s.cordon("A")
    assert c.s.peers["A"].cordoned
    d = c.one("B", 0, 1.0)
    assert d.action == "source" and d.reason == "parents-unusable"
    # it survives re-registration and expiry
    c.peer("A", 2.0)
    assert c.s.peers["A"].cordoned
    c.s.expire(100.0)
    c.peer("A", 101.0)
    assert c.s.peers["A"].cordoned
    c.s.uncordon("A")
    assert not c.s.peers["A"].cordoned
    c.announce("A", [0], 102.0)
    c.peer("B", 102.0)
    assert c.parents("B", 0, 102.0) == ["A"]


def test_cordon_before_registration(c: Cluster) -> None:
    c.s.cordon("later")
    c.peer("later", 1.0)
    assert c.s.peers["later"].cordoned
    c.s.uncordon("later")
    assert not c.s.peers["later"].cordoned


def test_uncordon_unknown_peer(c: Cluster) -> None:
    with pytest.raises(UnknownPeer):
        c.s.uncordon("nobody")


# --- blob mismatch ----------------------------------------------------------------------------

def test_blob_mismatch_clears_an_unsealed_map(c: Cluster) -> None:
    c.schedule("A", range(4), 0.0)
    c.announce("A", range(4), 0.5)
    c.schedule("B", range(4, 8), 0.5)
    c.s.blob_mismatch("C", TASK, 0.5)
    task = c.s.tasks[TASK]
    assert task.pieces == {} and task.leases == {} and task.held == {}
    ds = c.schedule("D", range(8), 0.6)
    assert {d.action for d in ds} == {"source"}
    assert {d.reason for d in ds} == {"new-task"}
    # the origin is the judge again: a different chunk is now accepted
    assert c.announce("D", {0: chunk(4242)}, 0.7).rejected == []


def test_blob_mismatch_resets_a_sealed_map_and_flags_its_authors(c: Cluster) -> None:
    forged = {i: chunk(900 + i) for i in range(8)}
    c.announce("A", forged, 0.0, sealed=True)  # two colluders confirm each other
    c.announce("B", forged, 0.0, sealed=True)
    assert c.s.tasks[TASK].meta.sealed
    c.s.blob_mismatch("C", TASK, 1.0)
    task = c.s.tasks[TASK]
    assert not task.meta.sealed
    assert task.pieces == {} and task.leases == {} and task.held == {}
    assert task.trust.confirmed == () and task.trust.authors == ()
    a = c.s.peers["A"]
    assert a.penalty_reason == "mismatch" and a.penalised(1.0 + PENALTY_SECONDS["mismatch"] - 1)
    assert not c.s.peers["B"].penalised(1.0)  # agreed only: the author is A
    assert not c.s.peers["C"].penalised(1.0)
    assert c.one("C", 0, 1.5).action == "source"
    assert c.announce("C", {0: chunk(0)}, 1.6).rejected == []  # the origin judges again


def test_blob_mismatch_is_rate_limited_per_reporter(c: Cluster) -> None:
    c.announce("A", range(8), 0.0)
    c.s.blob_mismatch("C", TASK, 1.0)
    c.announce("A", range(8), 2.0)
    c.s.blob_mismatch("C", TASK, 2.0 + RESET_EVERY / 2)  # too soon: ignored
    assert c.holders(0) == {"A"}
    c.s.blob_mismatch("D", TASK, 3.0)  # another reporter may
    assert c.holders(0) == set()
    c.announce("A", range(8), 4.0)
    c.s.blob_mismatch("C", TASK, 1.0 + RESET_EVERY)
    assert c.holders(0) == set()
    assert set(c.s.tasks[TASK].trust.resets) == {"C", "D"}


def test_a_reporter_is_not_flagged_for_its_own_map(c: Cluster) -> None:
    c.announce("A", range(8), 0.0)
    c.s.blob_mismatch("A", TASK, 1.0)
    assert not c.s.peers["A"].penalised(1.0)
    assert c.holders(0) == set()


# --- registries -------------------------------------------------------------------------------

REG_A, REG_B = "https://a.example", "http://b.example:5000"


def test_a_map_is_bound_to_its_first_requesters_registry(c: Cluster) -> None:
    assert {d.action for d in c.schedule("A", range(8), 0.0, registry=REG_A)} == {"source"}
    assert c.s.tasks[TASK].trust.registry == REG_A
    c.announce("A", range(8), 0.5, registry=REG_A)
    # A requester of another registry reads its own origin directly: no lease, no holders.
    ds = c.schedule("B", range(8), 1.0, registry=REG_B)
    assert {(d.action, d.epoch, d.reason) for d in ds} == {("source", None, "other-registry")}
    assert c.parents("C", 0, 1.0, registry=REG_A) == ["A"]
    assert c.s.tasks[TASK].leases == {}


def test_another_registrys_claims_are_not_blamed(c: Cluster) -> None:
    c.announce("A", {0: chunk(0), 1: chunk(1)}, 0.0, registry=REG_A)
    reply = c.announce("B", {0: chunk(0), 1: chunk(111), 2: chunk(2)}, 1.0, registry=REG_B)
    assert reply.accepted == 1 and reply.rejected == [] and sorted(reply.deferred) == [1, 2]
    assert not c.s.peers["B"].penalised(1.0)
    assert c.holders(0) == {"A", "B"}  # agreeing bytes: a holder like any other
    assert c.holders(1) == {"A"} and 2 not in c.s.tasks[TASK].pieces
    assert c.s.tasks[TASK].trust.authors == ("A",)
    # ...but a conflicting claim of the map's own registry is
    assert c.announce("C", {1: chunk(111)}, 1.0, registry=REG_A).rejected == [1]
    assert c.s.peers["C"].penalised(1.0)


def test_another_registrys_mismatch_does_not_reset_the_map(c: Cluster) -> None:
    c.announce("A", range(8), 0.0, registry=REG_A)
    c.s.blob_mismatch("B", TASK, 1.0, REG_B)
    assert c.holders(0) == {"A"}
    c.s.blob_mismatch("B", TASK, 1.0, REG_A)
    assert c.holders(0) == set()


def test_a_sealed_map_is_for_every_registry(c: Cluster) -> None:
    c.announce("A", range(8), 0.0, registry=REG_A, sealed=True)
    c.announce("B", range(8), 0.0, registry=REG_B, sealed=True)  # agrees: confirms
    assert c.s.tasks[TASK].meta.sealed
    assert set(c.parents("C", 0, 1.0, registry=REG_B)) == {"A", "B"}
    assert c.announce("D", {0: chunk(5)}, 1.0, registry=REG_B).rejected == [0]
    assert c.s.peers["D"].penalised(1.0)


def test_a_peer_naming_no_registry_is_bound_by_nothing(c: Cluster) -> None:
    c.announce("A", range(4), 0.0)  # an older peer: the map stays unbound
    assert c.s.tasks[TASK].trust.registry is None
    assert c.parents("B", 0, 0.1, registry=REG_A) == ["A"]
    c.announce("B", range(4, 8), 0.2, registry=REG_A)  # binds it
    assert c.s.tasks[TASK].trust.registry == REG_A
    assert c.parents("C", 5, 0.3) == ["B"]  # and an older peer still reads it
    assert c.one("D", 5, 0.3, registry=REG_B).reason == "other-registry"


def test_a_map_nobody_holds_is_rebound(c: Cluster) -> None:
    c.schedule("A", [0], 0.0, registry=REG_A)
    c.announce("A", {0: chunk(999)}, 0.1, registry=REG_A)
    c.s.leave("A")
    d = c.one("B", 0, 5.0, registry=REG_B)  # cold: B's registry takes the map over
    assert d.action == "source" and d.epoch is not None
    assert c.s.tasks[TASK].trust.registry == REG_B
    assert c.announce("B", {0: chunk(0)}, 5.1, registry=REG_B).rejected == []


def test_blob_mismatch_unknown(c: Cluster) -> None:
    with pytest.raises(UnknownPeer):
        c.s.blob_mismatch("nobody", TASK, 0.0)
    with pytest.raises(UnknownTask):
        c.s.blob_mismatch("A", URL_TASK, 0.0)


# --- cluster counters -------------------------------------------------------------------------

def test_counters_sum_live_peers(c: Cluster) -> None:
    c.heartbeat("A", 1.0, origin=100, served=400)
    c.heartbeat("B", 1.0, peer=300, local=50, served=100, uploaded=7)
    assert c.s.cluster_counters() == {"origin": 100, "peer": 300, "local": 50, "served": 500,
                                      "uploaded": 7}
    assert c.s.savings_ratio() == pytest.approx(1 - 100 / 500)
    c.heartbeat("A", 2.0, origin=150, served=500)  # cumulative: replaces, not adds
    assert c.s.cluster_counters()["origin"] == 150


def test_savings_ratio_without_traffic() -> None:
    assert Cluster().s.savings_ratio() == 0.0


def test_counters_survive_a_restart(c: Cluster) -> None:
    c.heartbeat("A", 1.0, started_at=1.0, origin=100, served=100)
    c.peer("A", 2.0)  # the restarted process registers again ...
    assert c.s.cluster_counters()["origin"] == 100
    c.heartbeat("A", 2.0, started_at=2.0, origin=5, served=5)  # ... and counts from zero
    assert c.s.cluster_counters()["origin"] == 105
    assert c.s.cluster_counters()["served"] == 105
    c.heartbeat("A", 3.0, started_at=2.0, origin=10, served=10)
    assert c.s.cluster_counters()["origin"] == 110


def test_counters_survive_leave_and_expiry(c: Cluster) -> None:
    c.heartbeat("A", 1.0, origin=100)
    c.heartbeat("B", 1.0, origin=20)
    c.s.leave("A")
    assert c.s.cluster_counters()["origin"] == 120
    c.s.expire(100.0)
    assert c.s.cluster_counters()["origin"] == 120
    c.peer("A", 101.0)
    c.heartbeat("A", 101.0, started_at=101.0, origin=1)
    assert c.s.cluster_counters()["origin"] == 121


def test_expired_peer_returning_with_same_process_is_not_double_counted(c: Cluster) -> None:
    c.heartbeat("A", 1.0, started_at=1.0, origin=100)
    assert "A" in c.s.expire(1.0 + 3 * HB + 1)
    c.peer("A", 20.0)
    c.heartbeat("A", 20.0, started_at=1.0, origin=110)
    assert c.s.cluster_counters()["origin"] == 110


# Each step: (peer index, action); actions: 'inc' adds bytes, 'restart', 'leave', 'expire'.
steps = st.lists(st.tuples(st.integers(min_value=0, max_value=2),
                           st.sampled_from(["inc", "inc", "inc", "restart", "leave", "expire"]),
                           st.integers(min_value=0, max_value=1000)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_cluster_counters_never_go_backwards(ops: list[tuple[int, str, int]]) -> None:
    cl = Cluster()
    now = 0.0
    # per peer: current process start and its cumulative counters; None when not registered
    procs: dict[str, list[float | int] | None] = {f"p{i}": None for i in range(3)}
    finished = 0  # bytes of processes that ended (what the cluster must still count)
    last = cl.s.cluster_counters()
    for idx, action, amount in ops:
        now += 1.0
        pid = f"p{idx}"
        if procs[pid] is None or action == "restart":
            if procs[pid] is not None:
                finished += procs[pid][1]
            procs[pid] = [now, 0]
            cl.peer(pid, now)
        if action == "leave" and pid in cl.s.peers:
            finished += procs[pid][1]
            procs[pid] = None
            cl.s.leave(pid)
        elif action == "expire":
            # everyone else heartbeats; this peer goes silent and is expired
            for other, proc in procs.items():
                if other != pid and proc is not None:
                    cl.heartbeat(other, now + 3 * HB + 1, started_at=proc[0], origin=proc[1],
                                 served=proc[1])
            gone = cl.s.expire(now + 3 * HB + 1)
            now += 3 * HB + 1
            for g in gone:
                finished += procs[g][1]
                procs[g] = None
        elif action in ("inc", "restart"):
            procs[pid][1] += amount
            cl.heartbeat(pid, now, started_at=procs[pid][0], origin=procs[pid][1],
                         served=procs[pid][1])
        counters = cl.s.cluster_counters()
        for k in counters:
            assert counters[k] >= last[k], (k, counters, last)
        live = sum(p[1] for p in procs.values() if p is not None)
        assert counters["origin"] == counters["served"] == finished + live
        last = counters


# --- load spreading ---------------------------------------------------------------------------

def fifty_requesters(seed: int) -> list[Counter[str]]:
    """50 requesters want one piece that 5 holders (4 upload slots each) hold, all asking at the
    same instant (no load reports), then again each time the children sent to fetch it have
    finished and announced it. Returns, per round, how often each holder was ranked first."""
    cl = Cluster(seed=seed)
    for i in range(5):
        cl.peer(f"h{i}", upload_slots=4)
    for i in range(50):
        cl.peer(f"r{i}")
    cl.task(pieces=1)
    for i in range(5):
        cl.announce(f"h{i}", [0], 0.0)
    waiting = [f"r{i}" for i in range(50)]
    rounds: list[Counter[str]] = []
    now = 0.0
    while waiting:
        firsts: Counter[str] = Counter()
        admitted = []
        for r in waiting:
            d = cl.one(r, 0, now)
            if d.action == "wait":
                assert d.reason == "holders-busy"
                continue
            assert d.action == "parents"
            assert len({p.id for p in d.parents}) == len(d.parents) == PARENTS_PER_PIECE
            firsts[d.parents[0].id] += 1
            admitted.append(r)
        assert admitted, "no progress"
        for r in admitted:
            cl.announce(r, [0], now)
        waiting = [r for r in waiting if r not in admitted]
        rounds.append(firsts)
        now += 0.1
    return rounds


@pytest.mark.usefixtures("one_child")
@pytest.mark.parametrize("seed", range(20))
def test_fifty_requesters_fan_out_as_a_tree(seed: int) -> None:
    rounds = fifty_requesters(seed)
    # One child in flight per holder: the holders double each round, 5 take 5 children, then
    # 10 take 10, 20 take 20, and the last 15 go; each holder first-ranked once in the first.
    assert [sum(r.values()) for r in rounds] == [5, 10, 20, 15]
    assert rounds[0] == {f"h{i}": 1 for i in range(5)}
    # No holder is ever handed more children at once than its upload slots.
    assert max(max(r.values()) for r in rounds) <= 4, rounds


@pytest.mark.usefixtures("two_children")
@pytest.mark.parametrize("seed", range(5))
def test_two_children_per_holder_fan_out_as_a_tree_of_threes(seed: int) -> None:
    rounds = fifty_requesters(seed)
    # 5 holders take 10 children, then 15 take 30, then the last 10 go: three rounds, each
    # holder first-ranked exactly twice in the first.
    assert [sum(r.values()) for r in rounds] == [10, 30, 10]
    assert rounds[0] == {f"h{i}": 2 for i in range(5)}
    # No holder is ever handed more children at once than its upload slots.
    assert max(max(r.values()) for r in rounds) <= 4, rounds


@pytest.mark.usefixtures("two_children")
def test_a_busy_piece_is_waited_for_never_fetched_from_the_origin() -> None:
    cl = Cluster()
    for pid in ("h", "a", "b", "c"):
        cl.peer(pid)
    cl.task(pieces=1)
    cl.announce("h", [0], 0.0)
    assert cl.one("a", 0, 0.0).action == "parents"
    assert cl.one("b", 0, 0.0).action == "parents"
    d = cl.one("c", 0, 0.0)
    assert (d.action, d.reason) == ("wait", "holders-busy")
    assert cl.s.back_to_source == 0
    assert cl.one("a", 0, 0.1).action == "parents"  # a child asking again keeps its place
    cl.announce("a", [0], 0.2)  # a finished: a holder now, room for c
    assert [p.id for p in cl.one("c", 0, 0.2).parents][:1] in (["h"], ["a"])

    # Children that never finish stop counting after a lease timeout.
    cl = Cluster()
    for pid in ("h", "a", "b", "c"):
        cl.peer(pid)
    cl.task(pieces=1)
    cl.announce("h", [0], 0.0)
    assert [cl.one(p, 0, 0.0).action for p in "abc"] == ["parents", "parents", "wait"]
    assert cl.one("c", 0, LEASE - 0.01).action == "wait"
    assert cl.one("c", 0, LEASE + 0.01).action == "parents"


# --- a large swarm: a sample of the holders is weighed ----------------------------------------

def test_a_piece_with_many_holders_weighs_a_sample_and_still_spreads_its_children() -> None:
    cl = Cluster()
    holders = [f"h{i:03d}" for i in range(HOLDER_SAMPLE * 10)]
    for pid in holders:
        cl.peer(pid)
    cl.task(pieces=1)
    for pid in holders:
        cl.announce(pid, [0], 0.0)
    children = [f"c{i:03d}" for i in range(HOLDER_SAMPLE * 4)]
    firsts: Counter[str] = Counter()
    for pid in children:
        cl.peer(pid)
        d = cl.one(pid, 0, 0.0)
        # The share of children in flight is counted against every usable holder, not the
        # sample's: 96 children of 240 holders all go now.
        assert d.action == "parents" and len(d.parents) == PARENTS_PER_PIECE, d
        firsts[d.parents[0].id] += 1
    # Spread over the swarm, never piled on a few (a holder's handouts count against it).
    assert len(firsts) >= len(children) * 0.6 and max(firsts.values()) <= 2, firsts


def test_an_unlucky_sample_of_holders_falls_back_to_all_of_them() -> None:
    cl = Cluster()
    holders = [f"h{i:03d}" for i in range(HOLDER_SAMPLE * 4)]
    for pid in holders:
        cl.peer(pid)
    cl.peer("me")
    cl.task(pieces=1)
    for pid in holders:
        cl.announce(pid, [0], 0.0)
    # All but two holders are penalised: a sample of 24 of the 96 most likely misses both.
    for pid in holders[2:]:
        cl.report("me", pid, "failed", 0.0)
    for attempt in range(5):
        d = cl.one("me", 0, 0.1 + attempt)
        assert d.action == "parents" and {p.id for p in d.parents} == set(holders[:2]), d


# --- IDCs: a piece crosses into an IDC once, then spreads inside it ---------------------------

def idc_cluster(locals_: int = 3) -> Cluster:
    """`far` (idc1) holds the one piece; `a0`.. (idc2) want it."""
    cl = Cluster()
    cl.peer("far", idc="idc1", upload_slots=8)
    for i in range(locals_):
        cl.peer(f"a{i}", idc="idc2")
    cl.task(pieces=1)
    cl.announce("far", [0], 0.0)
    return cl


@pytest.mark.usefixtures("two_children")
def test_the_first_requester_of_an_idc_crosses_the_rest_wait_for_its_copy() -> None:
    cl = idc_cluster()
    d = cl.one("a0", 0, 0.0)
    assert d.action == "parents" and [p.id for p in d.parents] == ["far"]
    # far has room for more children, but a copy into idc2 is in flight: wait for it.
    for pid in ("a1", "a2"):
        d = cl.one(pid, 0, 0.1)
        assert (d.action, d.reason) == ("wait", "idc-copy-in-flight")
    assert cl.one("a0", 0, 0.2).action == "parents"  # the copy's child asking again is no wait
    cl.announce("a0", [0], 0.5)
    # The copy landed: the IDC's requesters fetch it inside the IDC.
    for pid in ("a1", "a2"):
        d = cl.one(pid, 0, 0.5)
        assert d.action == "parents" and d.parents[0].id == "a0", d
    assert cl.s.back_to_source == 0


def test_a_copy_in_flight_holds_its_idc_back_only_for_a_lease_timeout() -> None:
    cl = idc_cluster()
    assert cl.one("a0", 0, 0.0).action == "parents"  # a0 dies mid-copy
    assert cl.one("a1", 0, LEASE - 0.01).reason == "idc-copy-in-flight"
    d = cl.one("a1", 0, LEASE + 0.01)
    assert d.action == "parents" and d.parents[0].id == "far"


@pytest.mark.usefixtures("two_children")
def test_a_child_of_another_idc_or_none_holds_nobody_back() -> None:
    cl = idc_cluster()
    cl.peer("far2", idc="idc1")
    cl.announce("far2", [0], 0.0)  # two holders: room for four children
    cl.peer("b", idc="idc3")
    cl.peer("plain")  # no IDC label
    assert cl.one("b", 0, 0.0).action == "parents"
    assert cl.one("plain", 0, 0.0).action == "parents"
    assert cl.one("a0", 0, 0.0).action == "parents"  # idc3's and no IDC's copies are not idc2's
    # An unlabelled requester behaves as before: idc2's copy in flight does not hold it back.
    cl.peer("plain2")
    assert cl.one("plain2", 0, 0.0).action == "parents"


@pytest.mark.usefixtures("two_children")
def test_a_local_holder_unusable_to_the_requester_lets_it_cross_once() -> None:
    cl = idc_cluster()
    cl.announce("a0", [0], 0.0)  # a local holder, which a1 excludes (it failed a1)
    d = cl.one("a1", 0, 0.0, exclude=["a0"])
    assert d.action == "parents" and [p.id for p in d.parents] == ["far"]
    d = cl.one("a2", 0, 0.0, exclude=["a0"])
    assert (d.action, d.reason) == ("wait", "idc-copy-in-flight")
    assert cl.one("a2", 0, 0.0).parents[0].id == "a0"  # a0 is usable to a2


@pytest.mark.usefixtures("two_children")
def test_a_sample_of_holders_missing_the_idc_still_finds_its_holder() -> None:
    cl = Cluster()
    far = [f"f{i:03d}" for i in range(HOLDER_SAMPLE * 10)]
    for pid in far:
        cl.peer(pid, idc="idc1")
    cl.peer("near", idc="idc2", upload_slots=64)  # its handouts to `me` leave it free
    cl.peer("me", idc="idc2")
    cl.peer("crossing", idc="idc2")
    cl.task(pieces=1)
    for pid in far:
        cl.announce(pid, [0], 0.0)
    cl.announce("near", [0], 0.0)
    # a copy into idc2 is in flight, yet idc2 has a holder: no wait, and the holder is offered
    # (a sample of 24 of 241 holders most likely misses it)
    cl.s.tasks[TASK].pieces[0].children = {"crossing": 0.0}
    for attempt in range(5):
        d = cl.one("me", 0, 0.1 * attempt)
        assert d.action == "parents" and "near" in {p.id for p in d.parents}, d


def test_an_idc_with_a_holder_spreads_it_within_its_own_share() -> None:
    # Offered only their IDC's holder, its requesters take CHILDREN_PER_HOLDER places: the far
    # holders' room is not theirs (it would pile them onto the one near holder).
    cl = Cluster()
    for k in range(4):
        cl.peer(f"far{k}", idc="idc1")
    cl.peer("near", idc="idc2", upload_slots=8)
    wanting = [f"a{i}" for i in range(CHILDREN_PER_HOLDER + 1)]
    for pid in wanting:
        cl.peer(pid, idc="idc2")
    cl.task(pieces=1)
    for pid in ("far0", "far1", "far2", "far3", "near"):
        cl.announce(pid, [0], 0.0)
    for pid in wanting[:-1]:
        assert [p.id for p in cl.one(pid, 0, 0.0).parents] == ["near"]
    d = cl.one(wanting[-1], 0, 0.0)
    assert (d.action, d.reason) == ("wait", "holders-busy")
    cl.announce(wanting[0], [0], 0.1)  # a child finished: a second near holder, room again
    assert {p.id for p in cl.one(wanting[-1], 0, 0.1).parents} <= {"near", wanting[0]}


# --- what a decision weighs is current (PeerState.candidate caches it per report) --------------

def test_a_load_reported_between_decisions_reranks_the_holders(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    c.announce("B", [0], 0.0)
    c.heartbeat("A", 0.0, active=1)
    c.heartbeat("B", 0.0, active=2)
    assert c.parents("C", 0, 1.0) == ["A", "B"]  # the emptier first
    c.heartbeat("A", 10.0, active=8)  # all of A's slots now busy
    assert c.parents("D", 0, 20.0) == ["B", "A"]
    c.heartbeat("A", 30.0, active=0)
    c.heartbeat("B", 30.0, active=8)
    c.peer("E", 30.0)
    assert c.parents("E", 0, 40.0) == ["A", "B"]


def test_a_reregistration_between_decisions_counts_its_new_slots(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    c.announce("B", [0], 0.0)
    c.heartbeat("A", 0.0, active=1)
    c.heartbeat("B", 0.0, active=2)
    assert c.parents("C", 0, 1.0) == ["A", "B"]
    c.s.register(PeerRegistration(id="A", upload_addr="10.0.0.1:65002", upload_slots=1), 10.0)
    assert c.holders(0) == {"A", "B"}  # the same process keeps its holdings
    assert c.parents("D", 0, 20.0) == ["B", "A"]  # A's one slot is in use


@pytest.mark.usefixtures("two_children")
def test_a_child_done_or_stale_frees_its_place_in_a_full_share(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    assert c.parents("B", 0, 1.0) == ["A"]
    assert c.parents("C", 0, 1.0) == ["A"]  # A's share: two children
    assert c.one("D", 0, 1.1) == Decision(piece=0, action="wait", reason="holders-busy")
    c.announce("B", [0], 1.2)  # a holder now, no longer in flight; cordoned: A's share only
    c.s.cordon("B")
    assert c.parents("D", 0, 1.3) == ["A"]
    c.peer("E", 1.5)
    assert c.one("E", 0, 1.5) == Decision(piece=0, action="wait", reason="holders-busy")
    assert c.parents("E", 0, 1.0 + LEASE) == ["A"]  # C's fetch is stale by now


# --- the cost of a decision: shortcuts that answer as the full rule would ---------------------

class FullRule(ClusterState):
    """The rule without its `holders-busy` shortcut, to compare the shortcut against."""

    def _surely_busy(self, *args: object) -> bool:
        return False


class CountingShortcut(ClusterState):
    taken = 0

    def _surely_busy(self, *args: object) -> bool:
        busy = super()._surely_busy(*args)  # type: ignore[arg-type]
        self.taken += busy
        return busy


class PlainChildren(ClusterState):
    """A piece's children as the Redis store loads them, a plain dict in no order (children
    that became holders kept until pruned), walked where a `Children` is not."""

    def _admit_child(self, piece: PieceState, requester: str, holders: int,
                     now: float) -> bool:
        piece.children = dict(piece.children or {})
        return super()._admit_child(piece, requester, holders, now)


def in_flight(s: ClusterState, now: float) -> dict[int, dict[str, float]]:
    return {i: {c: t for c, t in (p.children or {}).items()
                if now - t < LEASE and c not in p.holders}
            for i, p in s.tasks[TASK].pieces.items()}


@settings(max_examples=60, deadline=None)
@given(holders=st.integers(1, 30), idcs=st.booleans(), seed=st.integers(0, 2**32))
def test_the_busy_shortcut_answers_draws_and_leaves_state_as_the_full_rule(
        holders: int, idcs: bool, seed: int) -> None:
    """The same calls on the rule with and without `_surely_busy`: the same decisions, the
    same children in flight, the same random numbers drawn (holder samples, ties), whatever
    the holders' count (sampled past HOLDER_SAMPLE), IDCs, penalties, cordons, exclusions,
    children that finish or go stale. A crowd of 90 on two pieces at a time, drawn from
    `seed`. And the same with children kept as a plain dict (the Redis store's), walked:
    the same decisions and draws, the same children in flight."""
    sides = [CountingShortcut(lease_timeout=LEASE, rng=random.Random(seed)),
             FullRule(lease_timeout=LEASE, rng=random.Random(seed)),
             PlainChildren(lease_timeout=LEASE, rng=random.Random(seed))]
    peers = [f"p{i:02d}" for i in range(90)]
    for s in sides:
        for n, pid in enumerate(peers):
            s.register(PeerRegistration(id=pid, upload_addr=f"10.0.0.{n + 1}:1",
                                        idc=f"i{n % 3}" if idcs and n % 5 else ""), 0.0)
        s.ensure_task(TaskRequest(task_id=TASK, length=4 * MiB, piece_size=MiB), 0.0)
        for pid in peers[:holders]:
            s.announce(Announce(peer_id=pid, task_id=TASK,
                                pieces=[PieceClaim(index=i, chunk=chunk(i)) for i in range(4)]),
                       0.0)
    ops = random.Random(seed)
    handed: list[tuple[str, int]] = []  # (child, piece) handed out, to finish later
    now = 0.0
    for _ in range(300):
        now += 0.01
        roll = ops.random()
        pid = ops.choice(peers)
        if roll < 0.8:
            piece = ops.randrange(2)
            req = ScheduleRequest(peer_id=pid, task_id=TASK, pieces=[piece, piece + 2],
                                  exclude=[ops.choice(peers)] if ops.random() < 0.2 else [])
            answers = [s.schedule(req, now) for s in sides]
            assert answers[0] == answers[1] == answers[2]
            handed += [(pid, d.piece) for d in answers[0] if d.action == "parents"]
            continue
        if roll >= 0.96:
            now += LEASE / 4
            continue
        if roll < 0.9:
            if not handed:
                continue
            child, piece = handed.pop(ops.randrange(len(handed)))
            ann = Announce(peer_id=child, task_id=TASK,
                           pieces=[PieceClaim(index=piece, chunk=chunk(piece))])
        cordon = ops.random() < 0.5
        for s in sides:
            if roll < 0.9:
                s.announce(ann, now)
            elif roll < 0.93:
                s.report(Report(peer_id=peers[-1], parent_id=pid, task_id=TASK, kind="failed"),
                         now)
            else:
                (s.cordon if cordon else s.uncordon)(pid)
    a, b = (s.tasks[TASK] for s in sides[:2])
    assert {i: p.children for i, p in a.pieces.items()} == \
        {i: p.children for i, p in b.pieces.items()}
    assert in_flight(sides[0], now) == in_flight(sides[2], now)
    assert sides[0].rng.getstate() == sides[1].rng.getstate() == sides[2].rng.getstate()
    for other in sides[1:]:
        assert {p: (s.handouts, s.handouts_at) for p, s in sides[0].peers.items()} == \
            {p: (s.handouts, s.handouts_at) for p, s in other.peers.items()}
    event(f"shortcut taken: {min(sides[0].taken // 10 * 10, 100)}+")


@pytest.mark.usefixtures("two_children")
@pytest.mark.parametrize("holders", [1, HOLDER_SAMPLE + 6])
def test_a_crowd_past_the_childrens_share_is_answered_by_the_shortcut(holders: int) -> None:
    s = CountingShortcut(lease_timeout=LEASE, rng=random.Random(0))
    ids = [f"h{i}" for i in range(holders)] + [f"c{i}" for i in range(3 * holders)]
    for n, pid in enumerate(ids):
        s.register(PeerRegistration(id=pid, upload_addr=f"10.0.{n // 250}.{n % 250}:1"), 0.0)
    s.ensure_task(TaskRequest(task_id=TASK, length=MiB, piece_size=MiB), 0.0)
    for pid in ids[:holders]:
        s.announce(Announce(peer_id=pid, task_id=TASK,
                            pieces=[PieceClaim(index=0, chunk=chunk(0))]), 0.0)
    answers = Counter(d.reason or d.action for pid in ids[holders:] for d in s.schedule(
        ScheduleRequest(peer_id=pid, task_id=TASK, pieces=[0]), 0.5))
    assert answers == {"parents": 2 * holders, "holders-busy": holders}
    assert s.taken == holders


class FirstHolders(ClusterState):
    """A store's own holder sample (the Redis store plans its reads with one)."""

    def _sample(self, piece: object, holders: set[str]) -> list[str]:
        return sorted(holders)[:HOLDER_SAMPLE]


def test_the_holder_sample_is_the_sample_hooks() -> None:
    s = FirstHolders(rng=random.Random(0))
    ids = [f"h{i:03d}" for i in range(HOLDER_SAMPLE * 4)]
    for n, pid in enumerate([*ids, "me"]):
        s.register(PeerRegistration(id=pid, upload_addr=f"10.0.0.{n % 250}:1"), 0.0)
    s.ensure_task(TaskRequest(task_id=TASK, length=MiB, piece_size=MiB), 0.0)
    for pid in ids:
        s.announce(Announce(peer_id=pid, task_id=TASK,
                            pieces=[PieceClaim(index=0, chunk=chunk(0))]), 0.0)
    for t in range(10):
        (d,) = s.schedule(ScheduleRequest(peer_id="me", task_id=TASK, pieces=[0]), 5.0 * t)
        assert {p.id for p in d.parents} <= set(ids[:HOLDER_SAMPLE]), d


def test_the_default_sample_draws_as_rng_sample_of_the_holders_listed() -> None:
    """What the Redis store's HolderSample reproduces: one `rng.sample(list(holders), n)`, in
    the set's order, the list kept from one change of the holders to the next."""
    cl = Cluster()
    ids = [f"h{i:03d}" for i in range(HOLDER_SAMPLE * 3)]
    for pid in ids:
        cl.peer(pid)
    cl.task(pieces=1)
    for pid in ids[:-1]:
        cl.announce(pid, [0], 0.0)
    piece = cl.s.tasks[TASK].pieces[0]
    for _ in range(2):
        expect = random.Random(7).sample(list(piece.holders), HOLDER_SAMPLE)
        cl.s.rng = random.Random(7)
        assert cl.s._sample(piece, piece.holders) == expect
        cl.announce(ids[-1], [0], 1.0)  # a holder more: the list follows
    assert set(piece.holders.ordered()) == set(ids)  # type: ignore[attr-defined]
    cl.s.withdraw(Withdraw(peer_id=ids[0], task_id=TASK, pieces=[0]))
    assert piece.holders.ordered() == list(piece.holders)  # type: ignore[attr-defined]
    assert ids[0] not in piece.holders.ordered()  # type: ignore[attr-defined]


@pytest.mark.usefixtures("two_children")
def test_a_parent_is_named_with_its_current_address_and_transport(c: Cluster) -> None:
    c.announce("A", [0], 0.0)
    c.s.register(PeerRegistration(id="C", upload_addr="10.9.9.3:1", transport=2), 0.0)
    addr = c.s.peers["A"].reg.upload_addr
    assert [(p.addr, p.transport) for p in c.one("B", 0, 1.0).parents] == [(addr, 1)]
    c.s.register(PeerRegistration(id="A", upload_addr="10.9.9.1:2", transport=2), 5.0)
    assert [(p.addr, p.transport) for p in c.one("B", 0, 10.0).parents] == [("10.9.9.1:2", 1)]
    assert [(p.addr, p.transport) for p in c.one("C", 0, 10.0).parents] == [("10.9.9.1:2", 2)]


def test_a_task_view_lists_its_leases_by_epoch(c: Cluster) -> None:
    assert c.one("A", 4, 0.0).epoch == 1
    assert c.one("B", 0, 0.0).epoch == 2
    c.announce("A", [4], 0.5)  # lease 1 ends; piece 4 leased again later, under epoch 3
    c.s.withdraw(Withdraw(peer_id="A", task_id=TASK, pieces=[4]))
    assert c.one("C", 4, 1.0).epoch == 3
    view = c.s.task_view(c.s.tasks[TASK], detail=True)
    assert [le["epoch"] for le in view["leases"]] == [2, 3]


@pytest.mark.parametrize("holders", [HOLDER_SAMPLE + 1, 64, 277, 278, 2600])
def test_the_holder_sample_draws_as_random_sample(holders: int) -> None:
    """The memory store's sample is `random.sample`'s, draw for draw (its algorithm inlined):
    a Python whose `random.sample` draws otherwise fails here, not in a store's comparison."""
    from scheduler.state import _draw_sample
    population = [f"h{i}" for i in range(holders)]
    ours, theirs = random.Random(holders), random.Random(holders)
    for _ in range(50):
        assert _draw_sample(ours, population) == theirs.sample(population, HOLDER_SAMPLE)
    assert ours.getstate() == theirs.getstate()


def test_a_candidates_handouts_are_policy_decayed(c: Cluster) -> None:
    from scheduler import policy
    c.announce("A", [0], 0.0)
    for t, who in ((1.0, "B"), (1.3, "C")):
        c.one(who, 0, t)
    a = c.s.peers["A"]
    for now in (1.3, 1.7, 9.0):
        (cand,) = c.s._candidates(c.s.tasks[TASK], [a], now)
        assert cand.handouts == policy.decayed(a.handouts, a.handouts_at, now) > 0


@pytest.mark.parametrize("change", [
    lambda h: h.add("z"), lambda h: h.discard("a"), lambda h: h.remove("a"), lambda h: h.pop(),
    lambda h: h.clear(), lambda h: h.update({"z"}), lambda h: h.difference_update({"a"}),
    lambda h: h.intersection_update({"a"}), lambda h: h.symmetric_difference_update({"a", "z"}),
    lambda h: h.__ior__({"z"}), lambda h: h.__iand__({"a"}), lambda h: h.__isub__({"a"}),
    lambda h: h.__ixor__({"z"})])
def test_holders_list_follows_every_change_in_place(change) -> None:  # type: ignore[no-untyped-def]
    from scheduler.state import Holders
    holders = Holders(f"h{i}" for i in range(40))
    for x in ("a", "b"):
        holders.add(x)
    assert holders.ordered() is holders.ordered() == list(holders)
    change(holders)
    assert holders.ordered() == list(holders) == sorted(set.__iter__(holders))


def test_holders_iterate_in_their_ids_order_whatever_the_string_hashing() -> None:
    """A set of peer ids iterates in its hash order, which PYTHONHASHSEED moves: the sample a
    decision draws and the ties the policy breaks followed it. A `Holders` is sorted, however
    its ids came and went."""
    from scheduler.state import Holders
    ids = [f"h{i:05d}" for i in range(300)]
    random.Random(1).shuffle(ids)
    holders = Holders(ids[:100])
    for pid in ids[100:]:
        holders.add(pid)
    for pid in ids[:50]:
        holders.discard(pid)
    assert list(holders) == holders.ordered() == sorted(ids[50:])
    assert holders.pop() == min(ids[50:]) and min(ids[50:]) not in holders


@pytest.mark.usefixtures("two_children")
def test_the_room_a_piece_has_is_two_children_per_holder_less_those_in_flight() -> None:
    s = ClusterState(lease_timeout=LEASE, rng=random.Random(0))
    ids = ["h0", "h1", *(f"c{i}" for i in range(6))]
    for n, pid in enumerate(ids):
        s.register(PeerRegistration(id=pid, upload_addr=f"10.0.0.{n + 1}:1"), 0.0)
    s.ensure_task(TaskRequest(task_id=TASK, length=2 * MiB, piece_size=MiB), 0.0)
    assert s.room(TASK, [0, 1], 0.0) == {0: 0, 1: 0}  # nobody holds them: no room
    s.announce(Announce(peer_id="h0", task_id=TASK, pieces=[PieceClaim(index=0, chunk=chunk(0))]),
               0.0)
    assert s.room(TASK, [0], 0.0) == {0: 2}
    answers = [s.schedule(ScheduleRequest(peer_id=c, task_id=TASK, pieces=[0]), 0.1)[0]
               for c in ("c0", "c1", "c2")]
    assert [d.reason or d.action for d in answers] == ["parents", "parents", "holders-busy"]
    assert s.room(TASK, [0], 0.1) == {0: 0}
    # c0 finished: one place its own, two for it as a holder.
    s.announce(Announce(peer_id="c0", task_id=TASK, pieces=[PieceClaim(index=0, chunk=chunk(0))]),
               0.2)
    assert s.room(TASK, [0], 0.2) == {0: 3}
    assert s.room(TASK, [0], 0.1 + LEASE) == {0: 4}  # c1 went stale
    pieces = s.tasks[TASK].pieces
    assert isinstance(pieces[0].children, Children) and not pieces[0].children


@pytest.mark.usefixtures("two_children")
def test_the_room_an_idc_requester_sees_is_its_own_idcs_holders_share() -> None:
    """A piece held in idc1 by one holder and in idc2 by two: an idc1 requester has room for
    CHILDREN_PER_HOLDER x 1 less every child in flight, an idc2 one for x 2 less them, an idc3
    one (no holder there) for one crossing, none while a copy into idc3 is in flight, a peer
    without an IDC for every holder's share; every admission takes a place of the others."""
    from scheduler.state import Room
    s = ClusterState(lease_timeout=LEASE, rng=random.Random(0))
    idcs = {"a": "idc1", "b": "idc2", "c": "idc2", "x1": "idc1", "x2": "idc1", "y": "idc2",
            "z1": "idc3", "z2": "idc3", "n": ""}
    for k, (pid, idc) in enumerate(idcs.items()):
        s.register(PeerRegistration(id=pid, upload_addr=f"10.0.0.{k + 1}:1", idc=idc), 0.0)
    s.ensure_task(TaskRequest(task_id=TASK, length=MiB, piece_size=MiB), 0.0)
    for pid in ("a", "b", "c"):
        s.announce(Announce(peer_id=pid, task_id=TASK,
                            pieces=[PieceClaim(index=0, chunk=chunk(0))]), 0.0)
    holders = s.tasks[TASK].pieces[0].holders
    assert holders.idcs(s.idc_of) == {"idc1": 1, "idc2": 2}

    def room() -> Room:
        (r,) = s.room(TASK, [0], 0.1).values()
        assert isinstance(r, Room)
        return r

    r = room()
    assert [r.take("x1"), r.take("x2")] == [True, True]  # idc1's share: 2
    assert not r.take("x1") and r.take("y") and r.take("y")  # idc2's 4, less the 2 taken
    assert not r.take("y") and not r.spent()  # 4 of 6 taken: z or n may still come
    assert r.take("z1") and not r.take("z2")  # idc3 crosses once
    assert r.take("n") and r.spent() and not r.take("n")
    # A copy into idc3 in flight: none of idc3 more, until it is a holder there.
    assert s.schedule(ScheduleRequest(peer_id="z1", task_id=TASK, pieces=[0]), 0.1)[0].action \
        == "parents"
    assert not room().take("z2")
    s.announce(Announce(peer_id="z1", task_id=TASK, pieces=[PieceClaim(index=0, chunk=chunk(0))]),
               0.2)
    assert holders.idcs(s.idc_of) == {"idc1": 1, "idc2": 2, "idc3": 1}  # kept, not recounted
    assert room().take("z2")
    # A holder gone, or moved to another IDC, is counted where it is.
    s.leave("b")
    assert holders.idcs(s.idc_of) == {"idc1": 1, "idc2": 1, "idc3": 1}
    s.register(PeerRegistration(id="c", upload_addr="10.0.0.3:1", idc="idc1"), 0.3)
    assert holders.idcs(s.idc_of) == {"idc1": 2, "idc3": 1}


def test_a_piece_whose_holders_have_no_idc_keeps_one_room_for_all() -> None:
    s = ClusterState(lease_timeout=LEASE, rng=random.Random(0))
    s.register(PeerRegistration(id="h", upload_addr="10.0.0.1:1"), 0.0)
    s.ensure_task(TaskRequest(task_id=TASK, length=MiB, piece_size=MiB), 0.0)
    s.announce(Announce(peer_id="h", task_id=TASK, pieces=[PieceClaim(index=0, chunk=chunk(0))]),
               0.0)
    assert s.room(TASK, [0], 0.0) == {0: CHILDREN_PER_HOLDER}
