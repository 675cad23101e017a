"""How the state's records are stored: the one table of a peer's fields, a task's fields, and
the encodings of pieces and leases."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.models import PeerCounters, PeerLoad, PeerRegistration, TaskMeta
from scheduler.state import Lease, PeerState, TaskTrust


def f(value: float) -> str:
    return repr(float(value))


class Parsed:
    """JSON fields that rarely change, parsed once per distinct value."""

    def __init__(self, model: Any, limit: int = 100_000) -> None:
        self.model = model
        self.limit = limit
        self.cache: dict[str, Any] = {}

    def __call__(self, raw: str) -> Any:
        value = self.cache.get(raw)
        if value is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            value = self.cache[raw] = self.model.model_validate_json(raw)
        return value


reg = Parsed(PeerRegistration)  # JSON: fields a newer peer adds (transport...) pass through
load = Parsed(PeerLoad)
counters = Parsed(PeerCounters)
meta = Parsed(TaskMeta)
trust = Parsed(TaskTrust)


@dataclass(frozen=True)
class PeerField:
    """One field of a peer's hash: the `PeerState` attribute it holds, how it is read back, and
    how a change is written. `hmax`: only ever rises (several replicas write it, so the latest
    wins whatever order the writes land in); `hsetx`: last writer wins, and only while the peer
    exists (a write never recreates an expired peer's hash)."""

    name: str
    decode: Callable[[str], Any]
    op: str

    def encode(self, value: Any) -> str:
        if isinstance(value, float | int):
            return f(value)
        return value if isinstance(value, str) else value.model_dump_json()


PEER_FIELDS = (
    PeerField("reg", reg, "hsetx"),
    PeerField("registered_at", float, "hsetx"),
    PeerField("last_seen", float, "hmax"),
    PeerField("load", load, "hsetx"),
    PeerField("counters", counters, "hsetx"),
    PeerField("penalty_until", float, "hmax"),
    PeerField("penalty_reason", str, "hsetx"),
    PeerField("handouts", float, "hsetx"),
    PeerField("handouts_at", float, "hsetx"),
)
PEER_NAMES = tuple(p.name for p in PEER_FIELDS)
TASK_FIELDS = ("meta", "created_at", "next_epoch", "v", "leases", "trust")
# The task's version as this layout's last write left it: while it is `v`, no replica of an
# earlier layout (which knows nothing of the holders fields' versions, keys.holders_seq) has
# written the task since, so those versions hold.
SEQ_VERSION = "nv"


def peer_values(peer: PeerState) -> tuple:
    """The peer's stored fields, in `PEER_FIELDS` order (to diff against what was loaded)."""
    return tuple(getattr(peer, p.name) for p in PEER_FIELDS)


def peer_from(values: list[str | None], cordoned: bool) -> PeerState | None:
    if any(v is None for v in values):  # absent, or not a whole record
        return None
    return PeerState(cordoned=cordoned, **{p.name: p.decode(v)  # type: ignore[arg-type]
                                           for p, v in zip(PEER_FIELDS, values, strict=True)})


class PeerCache:
    """Decoded peer records, by peer, kept while the raw record read back is the same: a
    decision reads up to HOLDER_SAMPLE holders' records per piece, and building each (its
    fields decoded, a `PeerState`, the diff's base) was ~20 % of a decision. Every call still
    reads the raw record, so what another replica wrote is seen at once: a raw record that
    differs is decoded afresh. A hit is a shallow copy of the decoded record (the rules change
    a record's attributes, never a cached model in place), with the caches the rules keep on
    it (`candidate`, `refs`: checked against the record's own reg and load) carried over from
    the last copy."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        # pid -> (raw values and cordon flag, decoded record, its stored values, last copy)
        self.entries: dict[str, list[Any]] = {}

    def get(self, pid: str, raw: list[str | None], cordoned: bool
            ) -> tuple[PeerState, tuple] | None:
        """A fresh record for the rules and the values it was loaded with; None: absent, or
        not a whole record."""
        key = (*raw, cordoned)
        entry = self.entries.get(pid)
        if entry is None or entry[0] != key:
            if None in raw:
                return None
            if entry is None or entry[0][-1] != cordoned:
                proto = peer_from(raw, cordoned)
                assert proto is not None
                values = peer_values(proto)
            else:  # most changes are a field or two (last_seen, handouts): the rest kept
                proto, values = _changed(entry, raw)
            if len(self.entries) >= self.limit:
                self.entries.clear()
            entry = self.entries[pid] = [key, proto, values, entry and entry[3]]
        proto, last = entry[1], entry[3]
        if last is not None:  # what the rules built on the last copy, still keyed right
            proto.candidate, proto.refs = last.candidate, last.refs
        peer = object.__new__(PeerState)
        peer.__dict__.update(proto.__dict__)
        peer.tasks = set()
        entry[3] = peer
        return peer, entry[2]


def _changed(entry: list[Any], raw: list[str | None]) -> tuple[PeerState, tuple]:
    """A cached record with the fields whose raw value changed decoded anew."""
    proto = object.__new__(PeerState)
    proto.__dict__.update(entry[1].__dict__)
    values = list(entry[2])
    for i, (new, old) in enumerate(zip(raw, entry[0], strict=False)):
        if new != old:
            fld = PEER_FIELDS[i]
            values[i] = fld.decode(new)
            setattr(proto, fld.name, values[i])
    return proto, tuple(values)


def peer_hash(peer: PeerState) -> list[str]:
    """A new peer's whole hash, as HSET arguments."""
    return [x for p, v in zip(PEER_FIELDS, peer_values(peer), strict=True)
            for x in (p.name, p.encode(v))]


def encode_holders(holders: set[str]) -> str:
    """A piece's field in the holders hash: `a,b` (peer ids cannot hold `,`, `|` or `=`)."""
    return ",".join(sorted(holders))


def append_holders(raw: str, ids: str) -> str:
    """A holders field with `ids` (encoded) joined: what the apply script's `happend` leaves."""
    holders, bar, legacy = raw.partition("|")
    return f"{holders},{ids}{bar}{legacy}" if holders else f"{ids}{bar}{legacy}"


def decode_holders(raw: str) -> tuple[set[str], str]:
    """A piece's holders, and what follows a `|`: the children a replica of the earlier layout
    wrote into the same field (`a,b|c=t,d=t`, rewritten whole on every hand-out). Each layout
    reads the other's field as its own: a replica of the earlier one sees the holders, and
    the children it records are moved into the children hash at this layout's next decision
    on the piece (`decode_legacy`)."""
    holders, _, legacy = raw.partition("|")
    return set(holders.split(",")) if holders else set(), legacy


def decode_legacy(legacy: str) -> dict[str, float]:
    return decode_children(kv.partition("=")[::2] for kv in legacy.split(",")) if legacy else {}


def decode_children(pairs: Any) -> dict[str, float]:
    """A piece's children hash (child -> when it was handed the piece), as `(child, t)`."""
    return {c: float(t) for c, t in pairs}


def encode_leases(leases: dict[int, Lease]) -> str:
    """A task's lease table, canonical (equal tables encode equal): pieces share Lease objects,
    one per run, so a run is written once with the pieces it still covers."""
    runs: dict[int, tuple[Lease, list[int]]] = {}
    for index, lease in leases.items():
        runs.setdefault(id(lease), (lease, []))[1].append(index)
    if not runs:
        return ""
    rows = sorted([le.epoch, le.holder, le.first, le.last, le.progress_at, sorted(pieces)]
                  for le, pieces in runs.values())
    return json.dumps(rows, separators=(",", ":"))


def decode_leases(raw: str | None) -> dict[int, Lease]:
    return dict(LoadedLeases(LeaseRows(raw or "")).items())


class LeaseRows:
    """A task's leases field parsed: its rows (`[epoch, holder, first, last, progress_at,
    pieces]`, one per run) and each leased piece's row. Never changed: shared by every load of
    the same field (`LeaseCache`)."""

    __slots__ = ("index", "raw", "rows")

    def __init__(self, raw: str) -> None:
        self.raw = raw
        self.rows: list[list[Any]] = json.loads(raw) if raw else []
        self.index = {i: r for r, row in enumerate(self.rows) for i in row[5]}


class LeaseCache:
    """The last leases field parsed, per task, while the field read back is the same."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.tasks: dict[str, LeaseRows] = {}

    def get(self, tid: str, raw: str) -> LeaseRows:
        rows = self.tasks.get(tid)
        if rows is None or rows.raw != raw:
            if len(self.tasks) >= self.limit:
                self.tasks.clear()
            rows = self.tasks[tid] = LeaseRows(raw)
        return rows


class LoadedLeases(dict):
    """A task's lease table as loaded (piece -> its run's `Lease`, one object per run, as the
    rules keep it): a run is decoded when one of its pieces is first read or written, every
    run when the table is iterated or counted. Decoding the whole field and encoding it again
    on every call made a call's cost grow with the task's live leases, when most calls only
    look up the leases of the pieces they name. `unchanged()`: whether the rules left the
    table as loaded (then the diff neither encodes nor writes it)."""

    __slots__ = ("_decoded", "_rows", "_whole", "changed")

    def __init__(self, rows: LeaseRows) -> None:
        super().__init__()
        self._rows = rows
        self._decoded: dict[int, Lease] = {}  # row -> its lease, once decoded
        self._whole = not rows.rows
        self.changed = False

    def _run(self, key: Any) -> None:
        if not self._whole:
            r = self._rows.index.get(key)
            if r is not None and r not in self._decoded:
                self._decode(r)

    def _decode(self, r: int) -> None:
        epoch, holder, first, last, progress_at, pieces = self._rows.rows[r]
        lease = self._decoded[r] = Lease(holder=holder, epoch=epoch, first=first, last=last,
                                         progress_at=progress_at)
        for i in pieces:
            dict.__setitem__(self, i, lease)

    def _all(self) -> None:
        if not self._whole:
            for r in range(len(self._rows.rows)):
                if r not in self._decoded:
                    self._decode(r)
            self._whole = True

    def unchanged(self) -> bool:
        """No piece's lease set or dropped, no decoded lease changed in place (a holder's
        progress)."""
        if self.changed:
            return False
        rows = self._rows.rows
        return all(rows[r][:5] == [le.epoch, le.holder, le.first, le.last, le.progress_at]
                   for r, le in self._decoded.items())

    def __getitem__(self, key: Any) -> Lease:
        self._run(key)
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._run(key)
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        self._run(key)
        return dict.__contains__(self, key)

    def __setitem__(self, key: Any, value: Lease) -> None:
        self._run(key)
        self.changed = True
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: Any) -> None:
        self._run(key)
        dict.__delitem__(self, key)
        self.changed = True

    def pop(self, key: Any, *default: Any) -> Any:
        self._run(key)
        if dict.__contains__(self, key):
            self.changed = True
        return dict.pop(self, key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._run(key)
        if not dict.__contains__(self, key):
            self.changed = True
        return dict.setdefault(self, key, default)

    def popitem(self) -> tuple[int, Lease]:
        self._all()
        self.changed = True
        return dict.popitem(self)

    def update(self, *args: Any, **kw: Any) -> None:
        self._all()
        self.changed = True
        dict.update(self, *args, **kw)

    def clear(self) -> None:
        self._whole = True
        self.changed = True
        dict.clear(self)

    def __len__(self) -> int:
        self._all()
        return dict.__len__(self)

    def __iter__(self):
        self._all()
        return dict.__iter__(self)

    def keys(self):
        self._all()
        return dict.keys(self)

    def values(self):
        self._all()
        return dict.values(self)

    def items(self):
        self._all()
        return dict.items(self)

    def copy(self) -> dict[int, Lease]:
        self._all()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self._all()
        if isinstance(other, LoadedLeases):
            other._all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._all()
        return dict.__repr__(self)
