"""Wire models between peers and schedulers (JSON over HTTP), validated with pydantic.

Every body a server accepts is parsed through one of these, so a malformed request answers 400
with the field that is wrong, and the OpenAPI document is generated from the same classes.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common import ids
from common.pieces import valid_piece_size

_PEER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HOSTPORT_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$")

PeerId = Annotated[str, Field(pattern=_PEER_ID_RE.pattern, max_length=128)]
ChunkId = Annotated[str, Field(pattern=r"^blake3:[0-9a-f]{64}$")]
TaskId = Annotated[str, Field(pattern=r"^(sha256|url):[0-9a-f]{64}$")]
Label = Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9._|/-]*$")]
PieceIndex = Annotated[int, Field(ge=0, le=(1 << 24))]
# Where a peer fetches a task from: an unsealed piece map is bound to its author's registry.
Registry = Annotated[str, Field(max_length=300, pattern=r"^https?://[^\s/?#@]+$",
                                description="scheme://host[:port] the peer fetches from")]
MAX_BATCH = 4096


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A field added to a model peers and schedulers exchange is left out of the JSON while it has
# its old meaning (`exclude_if`), so the other side, if older, does not refuse a field it does
# not know (extra="forbid"). Per field, not a wrap serializer on the model: that took a reply
# through Python dicts, 4x the cost of a schedule reply's encoding (measured, pydantic 2.14).
def _absent(value: object) -> bool:
    return value is None


def _http(transport: int) -> bool:
    return transport == 1


# Error codes in a 4xx body, for what a client must act on (not a message to match).
UNKNOWN_PEER = "unknown-peer"  # this scheduler does not know the peer: register first


class ErrorBody(BaseModel):
    """What every naiad server answers a refused request with: `{"error": ..., "code": ...}`
    (more fields may come; a body without `error` is not from a naiad server)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    error: str
    code: str | None = None


def valid_peer_id(value: str) -> bool:
    return bool(_PEER_ID_RE.match(value))


def split_hostport(value: str) -> tuple[str, int]:
    """`host:port`, or an upload address `https://host:port` (its upload port speaks TLS)."""
    m = _HOSTPORT_RE.match(value.removeprefix("https://"))
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"not host:port: {value[:100]!r}")
    return m.group(1).strip("[]"), int(m.group(2))


class PeerRegistration(Model):
    id: PeerId
    upload_addr: str = Field(description="host:port other peers dial for chunks (plain HTTP), "
                                         "or https://host:port for a TLS upload port")
    idc: Label = ""
    location: Label = Field("", description="a|b|c, most general first")
    upload_slots: int = Field(8, ge=1, le=4096)
    seed: bool = False
    started_at: float = Field(0.0, ge=0, description="the peer process's start time: a "
                              "registration from another process replaces what the peer "
                              "held (it re-announces its store); 0: unknown, kept")
    # Left out at 1 (HTTP only): what a scheduler before the field takes (peer/sched_session.py).
    transport: int = Field(1, ge=1, le=255, exclude_if=_http,
                           description="the peer-to-peer transports its upload port speaks, "
                                       "up to: 1 HTTP, 2 also the framed transport")

    @field_validator("upload_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        split_hostport(v)
        return v


class RegisterReply(Model):
    peer_id: str
    heartbeat_interval: float
    udp_addr: str | None = None
    scheduler_id: str


class PeerLoad(Model):
    active_uploads: int = Field(0, ge=0)
    # Peers send 0 today: the scheduler estimates it from the heartbeats' `uploaded` counter
    # (ClusterState._upload_rate); a peer that measures its own rate may send it instead.
    upload_rate: float = Field(0.0, ge=0, description=(
        "bytes/s the peer uploads at while it has uploads; 0: not measured (the scheduler "
        "then estimates it from successive heartbeats' uploaded counter)"))
    free_disk: int = Field(0, ge=0)


class PeerCounters(Model):
    """Cumulative byte counters of one peer process, reported with each heartbeat."""

    origin: int = Field(0, ge=0)
    peer: int = Field(0, ge=0)
    local: int = Field(0, ge=0)
    served: int = Field(0, ge=0)
    uploaded: int = Field(0, ge=0)
    started_at: float = Field(0.0, description="process start; a new value resets the baseline")


class Heartbeat(Model):
    load: PeerLoad = PeerLoad()
    counters: PeerCounters = PeerCounters()


class TaskRequest(Model):
    """Create-or-get a task. The first peer to name a task fixes its length and piece size."""

    task_id: TaskId
    length: int = Field(ge=0, le=1 << 50)
    piece_size: int | None = Field(None, description="proposal, used only for a new task")
    digest: str | None = None

    @field_validator("piece_size")
    @classmethod
    def _piece_size(cls, v: int | None) -> int | None:
        if v is not None and not valid_piece_size(v):
            raise ValueError("piece size must be a power of two between 64 KiB and 64 MiB")
        return v

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        return None if v is None else ids.parse_blob_digest(v)


class TaskMeta(Model):
    task_id: str
    length: int
    piece_size: int
    digest: str | None = None
    sealed: bool = False


class PieceClaim(Model):
    index: PieceIndex
    chunk: ChunkId


class LeaseProgress(Model):
    epoch: int = Field(ge=0)


class Announce(Model):
    peer_id: PeerId
    task_id: TaskId
    pieces: list[PieceClaim] = Field(default_factory=list, max_length=MAX_BATCH)
    sealed: bool = Field(False, description="the peer assembled the blob and its sha256 matched")
    progress: list[LeaseProgress] = Field(default_factory=list, max_length=MAX_BATCH,
                                          description="leases whose origin fetch moved bytes")
    registry: Registry | None = Field(None, description="where the pieces came from")


class AnnounceReply(Model):
    accepted: int
    rejected: list[int] = Field(default_factory=list,
                                description="claims refused (its maker penalised): not held")
    deferred: list[int] = Field(default_factory=list,
                                description="claims not recorded for now, nor blamed (another "
                                            "peer's lease is live, or the map is bound to "
                                            "another registry): announce them again later")


class ScheduleRequest(Model):
    peer_id: PeerId
    task_id: TaskId
    pieces: list[PieceIndex] = Field(min_length=1, max_length=MAX_BATCH)
    exclude: list[PeerId] = Field(default_factory=list, max_length=256)
    wait_ms: int = Field(0, ge=0, le=30_000,
                         description="hold the answer this long while every piece must wait")
    registry: Registry | None = Field(None, description="where the requester fetches from")
    announce: Announce | None = Field(
        None, exclude_if=_absent,
        description="this peer's claims, recorded before deciding as POST /announce records "
                    "them: one call instead of two (answered in `announced`)")


class ParentRef(Model):
    id: str
    addr: str
    # Left out when it is HTTP: what peers before it accept, so a rolling upgrade keeps them
    # pulling.
    transport: int = Field(1, ge=1, le=255, exclude_if=_http,
                           description="the transport to fetch with: the highest both the "
                                       "parent and the child speak")


class Decision(Model):
    """What to do about one piece: fetch it from parents, fetch it from the origin under a
    lease, or wait for the lease holder."""

    piece: int
    action: Literal["parents", "source", "wait"]
    chunk: str | None = None
    parents: list[ParentRef] = Field(default_factory=list)
    epoch: int | None = None
    first: int | None = None
    last: int | None = None
    reason: str | None = None


class ScheduleReply(Model):
    decisions: list[Decision]
    announced: AnnounceReply | None = Field(None, exclude_if=_absent,
                                            description="the answer to `announce`")


_DECISION_JSON = Decision.__pydantic_serializer__.to_json


def schedule_reply_json(decisions: list[Decision], announced: AnnounceReply | None = None
                        ) -> bytes:
    """`ScheduleReply(decisions=…, announced=…).model_dump_json()`, the same bytes, without
    building the reply model (which checks every decision again) and its serialisation of the
    list: each decision serialised by pydantic and joined (~4 -> ~2 us a reply; a fleet
    replica sends one per part and per call)."""
    body = b'{"decisions":[' + b",".join([_DECISION_JSON(d) for d in decisions]) + b"]"
    if announced is not None:
        body += b',"announced":' + announced.__pydantic_serializer__.to_json(announced)
    return body + b"}"


class Report(Model):
    peer_id: PeerId
    parent_id: PeerId
    task_id: TaskId
    piece: PieceIndex | None = None
    kind: Literal["failed", "slow", "corrupt"]


class Withdraw(Model):
    """A peer no longer holds these pieces (a failed scrub, an eviction); None: all."""

    peer_id: PeerId
    task_id: TaskId
    pieces: list[PieceIndex] | None = Field(None, max_length=MAX_BATCH)


class BlobMismatch(Model):
    peer_id: PeerId
    task_id: TaskId
    registry: Registry | None = Field(None, description="where the reporter fetched from")


class PreheatRequest(Model):
    """`{"image": "host/repo:tag"}` (or `http://host:port/repo:tag` for a plain-http
    registry), or `{"url": ...}` with an optional `digest`."""

    image: str | None = Field(None, max_length=1024)
    url: str | None = Field(None, max_length=4096)
    digest: str | None = None

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        return None if v is None else ids.parse_blob_digest(v)


class WorkItem(Model):
    """A blob or file a seed peer should hold, for a preheat job."""

    job: str
    task_id: TaskId
    url: str = Field(max_length=4096)
    registry: str = Field(max_length=1024)
    digest: str | None = None


class Work(Model):
    items: list[WorkItem] = Field(default_factory=list, max_length=MAX_BATCH)


# -- registry access answers shared through the scheduler (scheduler/access.py) -------------
# A key is an HMAC under the cluster secret of (credential, registry, scope): the scheduler
# never sees a credential, a repository or a URL, only this.
AccessKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ACCESS_TTL_MS = 60_000  # no shared answer outlives the registry's by more than this
ACCESS_WAIT_MS = 5_000


class AccessQuery(Model):
    """Has a registry answered this key lately? If not, the caller may be given the claim to
    ask it (one asker per key at a time); `wait_ms`: how long to wait for another's answer."""

    peer_id: PeerId
    key: AccessKey
    wait_ms: int = Field(0, ge=0, le=ACCESS_WAIT_MS)


class AccessAnswer(Model):
    """What the registry answered a peer for a key: a 2xx with the blob's length (a yes), a
    4xx (a refusal, which hides any yes while it lives), or a 5xx (nothing shared: it only
    gives the claim back). `ttl_ms`: how much longer the peer itself trusts the answer."""

    peer_id: PeerId
    key: AccessKey
    status: int = Field(ge=100, le=599)
    length: int | None = Field(None, ge=0, le=1 << 50)
    ttl_ms: int = Field(ge=0, le=ACCESS_TTL_MS)


class AccessReply(Model):
    """A shared answer (`status`, `length`, for `ttl_ms` more at most), or none: then `claimed`
    says the caller asks the registry and publishes what it says; unclaimed, another peer's
    question is still pending and the caller asks for itself."""

    status: int | None = None
    length: int | None = None
    ttl_ms: int = 0
    claimed: bool = False
