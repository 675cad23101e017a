"""The scheduler's OpenAPI 3.1 document, built from the same pydantic models that validate the
bodies (common/models.py) and from response models of the operator views below, so the document
cannot drift from what the code accepts. tests/test_openapi.py checks live responses against it.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common import models as m


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(_View):
    error: str


MEMBERS_ONLY = "only for a signed caller or the operator token"


class PeerView(_View):
    id: str
    upload_addr: str = Field("", description=MEMBERS_ONLY)
    idc: str
    location: str
    seed: bool
    upload_slots: int
    load: m.PeerLoad
    counters: m.PeerCounters
    cordoned: bool
    penalised: bool
    penalty_reason: str | None
    last_heartbeat_age: float
    registered_at: float
    tasks: int


class PeerList(_View):
    peers: list[PeerView]


class LeaseView(_View):
    holder: str
    epoch: int
    first: int
    last: int


class PieceView(_View):
    index: int
    chunk: str | None
    holders: list[str]
    lease: LeaseView | None


class TaskSummary(_View):
    task_id: str
    length: int
    piece_size: int
    digest: str | None
    sealed: bool
    pieces: int
    pieces_known: int
    holders: int
    complete_holders: int


class GridRow(_View):
    holder: str | None = Field(description="the holder's peer id; null for an unsigned caller")
    held: int = Field(description="pieces it holds")
    runs: list[tuple[int, int]] = Field(description="the pieces it holds as runs [first, last]")


class TaskDetail(TaskSummary):
    piece_map: list[PieceView] = Field(default_factory=list, description=MEMBERS_ONLY)
    leases: list[LeaseView] = Field(default_factory=list, description=MEMBERS_ONLY)
    grid: list[GridRow] = Field(description="pieces x holders, the most complete holders "
                                            "first (the console draws it)")


class TaskList(_View):
    tasks: list[TaskSummary]


class BytesBySource(_View):
    origin: int
    peer: int
    local: int


class Stats(_View):
    peers: int
    tasks: int
    bytes: BytesBySource
    served_bytes: int
    uploaded_bytes: int
    savings_ratio: float
    back_to_source: int


class SeriesBySource(_View):
    origin: list[int]
    peer: list[int]
    local: list[int]


class RatesBySource(_View):
    origin: list[float | None]
    peer: list[float | None]
    local: list[float | None]


class History(_View):
    """Columns: index i of every list is sample i, oldest first."""

    interval: float = Field(description="seconds between samples")
    capacity: int = Field(description="samples kept at most (an hour at the defaults)")
    window: float = Field(description="seconds the `saving` at each sample is taken over")
    t: list[float] = Field(description="when each sample was taken (Unix time, seconds)")
    bytes: SeriesBySource = Field(description="cumulative bytes obtained for clients by source")
    served_bytes: list[int] = Field(description="cumulative bytes served to clients")
    rates: RatesBySource = Field(description="bytes per second by source over the interval "
                                             "ending at each sample (null for the first)")
    saving: list[float | None] = Field(description="1 - origin bytes / bytes served over the "
                                                   "`window` before each sample (null: nothing "
                                                   "served)")
    saving_ratio: float | None = Field(description="the same over the whole history")


class JobItem(_View):
    task_id: str
    url: str = Field("", description=MEMBERS_ONLY)
    size: int | None
    held_by: list[str]
    pieces: int
    pieces_held: int


class JobView(_View):
    id: str
    target: str = Field("", description=MEMBERS_ONLY)
    state: str
    error: str | None = Field(None, description=MEMBERS_ONLY)
    progress: float
    created: float
    finished: float | None
    items: list[JobItem]


class JobList(_View):
    jobs: list[JobView]


class Empty(_View):
    pass


# (method, path, summary, request model, response model, operator-only mutation, internal)
OPERATIONS: list[tuple[str, str, str, type[BaseModel] | None, type[BaseModel] | None, bool,
                       bool]] = [
    ("get", "/api/v1/peers", "Live peers", None, PeerList, False, False),
    ("get", "/api/v1/peers/{peer_id}", "One peer", None, PeerView, False, False),
    ("delete", "/api/v1/peers/{peer_id}", "Cordon a peer: never handed out until uncordoned",
     None, None, True, False),
    ("post", "/api/v1/peers/{peer_id}/uncordon", "Lift a cordon", None, None, True, False),
    ("get", "/api/v1/tasks", "Known tasks", None, TaskList, False, False),
    ("get", "/api/v1/tasks/{task_id}", "A task's piece map: chunk ids, holders, leases",
     None, TaskDetail, False, False),
    ("get", "/api/v1/stats", "Bytes by source, saving, peers, tasks", None, Stats, False,
     False),
    ("get", "/api/v1/history", "The cluster's bytes by source and saving over the last hour, "
     "sampled every few seconds (the same on every replica)", None, History, False, False),
    ("post", "/api/v1/preheat", "Start a preheat job (an image or a URL)", m.PreheatRequest,
     JobView, True, False),
    ("get", "/api/v1/jobs", "Preheat jobs", None, JobList, False, False),
    ("get", "/api/v1/jobs/{job_id}", "A preheat job and its progress", None, JobView, False,
     False),
    ("post", "/api/v1/peers", "Register a peer", m.PeerRegistration, m.RegisterReply, False,
     True),
    ("post", "/api/v1/peers/{peer_id}/heartbeat", "Heartbeat over HTTP (UDP is preferred)",
     m.Heartbeat, Empty, False, True),
    ("post", "/api/v1/peers/{peer_id}/leave", "A peer leaves (SIGTERM drain)", None, Empty,
     False, True),
    ("post", "/api/v1/peers/{peer_id}/work", "Preheat work for a seed peer", m.Heartbeat,
     m.Work, False, True),
    ("post", "/api/v1/tasks", "Create or get a task (the first peer fixes its piece size)",
     m.TaskRequest, m.TaskMeta, False, True),
    ("post", "/api/v1/announce", "A peer holds these pieces", m.Announce, m.AnnounceReply,
     False, True),
    ("post", "/api/v1/withdraw", "A peer no longer holds these pieces", m.Withdraw, Empty,
     False, True),
    ("post", "/api/v1/schedule", "Parents, an origin lease, or wait, for each piece",
     m.ScheduleRequest, m.ScheduleReply, False, True),
    ("post", "/api/v1/reports", "A parent failed, stalled or served corrupt bytes", m.Report,
     Empty, False, True),
    ("post", "/api/v1/mismatches", "An assembled blob failed its digest", m.BlobMismatch,
     Empty, False, True),
    ("post", "/api/v1/access", "A registry's access answer shared by another peer, or the "
     "claim to ask it (keys are HMACs: scheduler/access.py)", m.AccessQuery, m.AccessReply,
     False, True),
    ("post", "/api/v1/access/answers", "What a registry answered a peer's access check",
     m.AccessAnswer, Empty, False, True),
]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


@functools.cache
def document() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    models = {Error} | {o[3] for o in OPERATIONS if o[3]} | {o[4] for o in OPERATIONS if o[4]}
    for model in sorted(models, key=lambda c: c.__name__):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    paths: dict[str, Any] = {}
    for method, path, summary, body, reply, operator, internal in OPERATIONS:
        op: dict[str, Any] = {
            "summary": summary,
            "tags": ["internal" if internal else "operators"],
            "responses": {"4XX": {"description": "refused, with a reason",
                                  "content": {"application/json": {"schema": _ref(Error)}}}},
        }
        ok = "202" if path.endswith("/preheat") else "200"
        op["responses"][ok] = {"description": "OK"}
        if reply is not None:
            op["responses"][ok]["content"] = {"application/json": {"schema": _ref(reply)}}
        if body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": _ref(body)}}}
        params = [p.strip("{}") for p in path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True,
                                 "schema": {"type": "string"}} for p in params]
        if operator:
            op["security"] = [{"operatorToken": []}]
        if internal:
            op["security"] = [{"clusterSecret": []}]
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "naiad scheduler", "version": "1",
                 "description": "Operators read the cluster and start preheat jobs; peers "
                                "(internal operations) register, announce and ask for parents."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "operatorToken": {"type": "http", "scheme": "bearer",
                                  "description": "operator calls need it when the scheduler "
                                                 "has --token"},
                "clusterSecret": {"type": "apiKey", "in": "header", "name": "X-Naiad-Auth",
                                  "description": "<ts>.<nonce>.<hmac> of time, nonce, method, "
                                                 "path and body under the cluster secret, "
                                                 "good once; operator calls take it when "
                                                 "there is no --token"},
            },
        },
    }
