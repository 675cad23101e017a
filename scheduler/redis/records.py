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
    leases: dict[int, Lease] = {}
    for epoch, holder, first, last, progress_at, pieces in json.loads(raw) if raw else ():
        lease = Lease(holder=holder, epoch=epoch, first=first, last=last,
                      progress_at=progress_at)
        for index in pieces:
            leases[index] = lease
    return leases
