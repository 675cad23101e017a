"""The peer's download engine (peer/engine/engine.py assembles it; docs/architecture.md names
each part)."""

from peer.engine.acquire import (
    BUSY_BACKOFF,
    BUSY_PATIENCE,
    BUSY_PATIENCE_ON_DEMAND,
    LONG_POLL_MS,
    ON_DEMAND_STALL,
    ON_DEMAND_WAIT,
    ORIGIN_ATTEMPTS,
    OUTAGE_PATIENCE,
    OUTAGE_POLL,
    OUTAGE_STALL,
    PARENT_ROUNDS,
    outage_wait,
)
from peer.engine.batcher import DecisionBatcher
from peer.engine.engine import Engine
from peer.engine.run import BlobCorrupt, LengthConflict, PieceUnavailable, Plan, TaskRun

__all__ = [
    "BUSY_BACKOFF", "BUSY_PATIENCE", "BUSY_PATIENCE_ON_DEMAND", "LONG_POLL_MS",
    "ON_DEMAND_STALL", "ON_DEMAND_WAIT", "ORIGIN_ATTEMPTS", "OUTAGE_PATIENCE", "OUTAGE_POLL",
    "OUTAGE_STALL", "PARENT_ROUNDS", "BlobCorrupt", "DecisionBatcher", "Engine",
    "LengthConflict", "PieceUnavailable", "Plan", "TaskRun", "outage_wait",
]
