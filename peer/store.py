"""The peer's content-addressed chunk store and its index of tasks.

Chunks live in `chunks/<2 hex>/<64 hex>`, named by the blake3 of their bytes, one file per
distinct chunk whatever number of tasks use it. A chunk is written to `tmp/` and renamed into
place only after its digest checked, so a file under `chunks/` is always whole and verified when
written (rot at rest is caught by re-hashing on serve). The index (sqlite, WAL) maps tasks to
their piece layout and which chunk each held piece is; it survives restarts and crashes.

Index calls run on the event loop thread (each is tens of microseconds); file I/O runs in worker
threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from common import ids
from common.models import TaskMeta

log = logging.getLogger("naiad.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    length INTEGER NOT NULL,
    piece_size INTEGER NOT NULL,
    digest TEXT,
    sealed INTEGER NOT NULL DEFAULT 0,
    last_access REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pieces (
    task_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    chunk TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (task_id, idx)
);
CREATE INDEX IF NOT EXISTS pieces_by_chunk ON pieces (chunk);
"""
# Index format. 2: `sealed` means this peer hashed the whole blob itself. Stores of version 0/1
# may hold a seal copied from the scheduler's word, so opening one forgets its seals once: the
# next whole read or the seal job proves them again.
SCHEMA_VERSION = 2


class ChunkCorrupt(Exception):
    """A stored chunk's bytes no longer hash to its name."""


@dataclass(frozen=True, slots=True)
class StoredTask:
    meta: TaskMeta
    pieces: dict[int, str]


class ChunkStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        self._db: sqlite3.Connection | None = None
        self.bytes = 0  # of chunk files the index refers to, each distinct chunk once

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        for i in range(256):
            (self.chunks_dir / f"{i:02x}").mkdir(exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():  # half-written chunks of a crashed run
            leftover.unlink(missing_ok=True)
        self._db = sqlite3.connect(self.root / "index.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version < SCHEMA_VERSION:
            self._db.execute("UPDATE tasks SET sealed = 0")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        dropped = self.check(full=False)
        if dropped:
            log.warning("dropped %d index entries whose chunk file is missing or torn", dropped)
        orphans = self._remove_orphans()
        if orphans:
            log.info("removed %d chunk files no task refers to", orphans)
        self.bytes = self.cache_bytes()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    def check(self, full: bool) -> int:
        """Drop index entries whose chunk is missing, of the wrong size, or (full) whose bytes
        do not hash to its name. Returns how many pieces were dropped."""
        bad: set[str] = set()
        rows = self.db.execute("SELECT DISTINCT chunk, size FROM pieces").fetchall()
        for chunk, size in rows:
            path = self.chunk_path(chunk)
            try:
                if path.stat().st_size != size:
                    bad.add(chunk)
                elif full:
                    self._read_verified(chunk)
            except (FileNotFoundError, ChunkCorrupt):
                bad.add(chunk)
        return sum(len(self.drop_chunk(c)) for c in bad)

    def _remove_orphans(self) -> int:
        """Chunk files written but never indexed (the process died between the two)."""
        known = {c.removeprefix(ids.BLAKE3_PREFIX)
                 for (c,) in self.db.execute("SELECT DISTINCT chunk FROM pieces")}
        removed = 0
        for sub in self.chunks_dir.iterdir():
            for entry in os.scandir(sub):
                if entry.name.partition(".")[0] not in known:  # a chunk or its sidecars
                    os.unlink(entry.path)
                    removed += 1
        return removed

    # -- chunks ----------------------------------------------------------------------------

    def chunk_path(self, chunk: str) -> Path:
        hexd = chunk.removeprefix(ids.BLAKE3_PREFIX)
        return self.chunks_dir / hexd[:2] / hexd

    def packed_path(self, chunk: str) -> Path:
        """The chunk zstd-compressed for the wire, kept beside it once made (peer/wire.py)."""
        return self.chunk_path(chunk).with_suffix(".zst")

    def raw_marker(self, chunk: str) -> Path:
        """An empty file saying the chunk does not compress: do not try again."""
        return self.chunk_path(chunk).with_suffix(".raw")

    def write_sidecar(self, path: Path, data: bytes) -> None:
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def has_chunk(self, chunk: str) -> bool:
        return self.chunk_path(chunk).exists()

    def _write_chunk(self, chunk: str, data: bytes | memoryview) -> bool:
        """Write a chunk file unless it exists; whether it was written."""
        path = self.chunk_path(chunk)
        if path.exists():
            return False
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def intact(self, chunk: str) -> bool:
        """Whether the chunk's file is there and hashes to its id."""
        try:
            self._read_verified(chunk)
        except (FileNotFoundError, ChunkCorrupt):
            return False
        return True

    def _read_verified(self, chunk: str) -> bytes:
        data = self.chunk_path(chunk).read_bytes()
        if ids.chunk_id(data) != chunk:
            raise ChunkCorrupt(chunk)
        return data

    async def put_piece(self, task_id: str, index: int, chunk: str,
                        data: bytes | memoryview) -> None:
        """Store verified bytes as `chunk` and record them as piece `index` of the task."""
        if await asyncio.to_thread(self._write_chunk, chunk, data):
            self.bytes += len(data)
        self.db.execute("INSERT OR REPLACE INTO pieces (task_id, idx, chunk, size) "
                        "VALUES (?, ?, ?, ?)", (task_id, index, chunk, len(data)))

    async def read_chunk(self, chunk: str, verify: bool) -> bytes:
        """The chunk's bytes; with `verify`, re-hashed first (raises ChunkCorrupt)."""
        if verify:
            return await asyncio.to_thread(self._read_verified, chunk)
        return await asyncio.to_thread(self.chunk_path(chunk).read_bytes)

    def drop_chunk(self, chunk: str) -> list[tuple[str, int]]:
        """Forget a chunk everywhere (it failed verification); returns the pieces it was."""
        rows = self.db.execute("SELECT task_id, idx, size FROM pieces WHERE chunk = ?",
                               (chunk,)).fetchall()
        self.db.execute("DELETE FROM pieces WHERE chunk = ?", (chunk,))
        self.db.executemany("UPDATE tasks SET sealed = 0 WHERE task_id = ?",
                            [(t,) for t in {r[0] for r in rows}])
        self._unlink(chunk, rows[0][2] if rows else 0)
        return [(r[0], r[1]) for r in rows]

    def _unlink(self, chunk: str, size: int) -> None:
        self.packed_path(chunk).unlink(missing_ok=True)
        self.raw_marker(chunk).unlink(missing_ok=True)
        try:
            self.chunk_path(chunk).unlink()
        except FileNotFoundError:
            return
        self.bytes -= size

    # -- tasks -----------------------------------------------------------------------------

    def put_task(self, meta: TaskMeta) -> None:
        self.db.execute(
            "INSERT INTO tasks (task_id, length, piece_size, digest, sealed) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT(task_id) DO NOTHING",
            (meta.task_id, meta.length, meta.piece_size, meta.digest, int(meta.sealed)))

    def task(self, task_id: str) -> TaskMeta | None:
        row = self.db.execute("SELECT task_id, length, piece_size, digest, sealed FROM tasks "
                              "WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        return TaskMeta(task_id=row[0], length=row[1], piece_size=row[2], digest=row[3],
                        sealed=bool(row[4]))

    def pieces(self, task_id: str) -> dict[int, str]:
        return dict(self.db.execute("SELECT idx, chunk FROM pieces WHERE task_id = ?",
                                    (task_id,)).fetchall())

    def piece_count(self, task_id: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM pieces WHERE task_id = ?",
                               (task_id,)).fetchone()[0]

    def mark_sealed(self, task_id: str) -> None:
        self.db.execute("UPDATE tasks SET sealed = 1 WHERE task_id = ?", (task_id,))

    def touch(self, task_id: str, now: float) -> None:
        self.db.execute("UPDATE tasks SET last_access = ? WHERE task_id = ?", (now, task_id))

    def drop_task(self, task_id: str) -> None:
        """Forget a task and delete the chunks no other task uses."""
        chunks = dict(self.db.execute(
            "SELECT chunk, size FROM pieces WHERE task_id = ?", (task_id,)).fetchall())
        self.db.execute("DELETE FROM pieces WHERE task_id = ?", (task_id,))
        self.db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
        for chunk, size in chunks.items():
            used = self.db.execute("SELECT 1 FROM pieces WHERE chunk = ? LIMIT 1",
                                   (chunk,)).fetchone()
            if used is None:
                self._unlink(chunk, size)

    def evict(self, target: int, busy: set[str]) -> list[str]:
        """Drop least recently used tasks, never one in `busy`, until the store holds at most
        `target` bytes; the tasks dropped."""
        dropped = []
        for (task_id,) in self.db.execute(
                "SELECT task_id FROM tasks ORDER BY last_access, task_id").fetchall():
            if self.bytes <= target:
                break
            if task_id not in busy:
                self.drop_task(task_id)
                dropped.append(task_id)
        return dropped

    def chunks_after(self, chunk: str, limit: int) -> list[tuple[str, int]]:
        """Distinct chunks (and sizes) in name order after `chunk`: a scrubber's cursor."""
        return self.db.execute("SELECT chunk, MAX(size) FROM pieces WHERE chunk > ? "
                               "GROUP BY chunk ORDER BY chunk LIMIT ?",
                               (chunk, limit)).fetchall()

    def tasks(self) -> list[StoredTask]:
        out = []
        for row in self.db.execute("SELECT task_id, length, piece_size, digest, sealed "
                                   "FROM tasks").fetchall():
            meta = TaskMeta(task_id=row[0], length=row[1], piece_size=row[2], digest=row[3],
                            sealed=bool(row[4]))
            out.append(StoredTask(meta=meta, pieces=self.pieces(meta.task_id)))
        return out

    def cache_bytes(self) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(size), 0) FROM "
                              "(SELECT chunk, MAX(size) AS size FROM pieces GROUP BY chunk)")
        return row.fetchone()[0]
