"""The peer's content-addressed chunk store and its index of tasks.

Chunks live in `chunks/<2 hex>/<64 hex>`, named by the blake3 of their bytes, one file per
distinct chunk whatever number of tasks use it. A chunk is written to `tmp/` and renamed into
place only after its digest checked, so a file under `chunks/` is always whole and verified when
written (rot at rest is caught by re-hashing on serve). The index (sqlite, WAL) maps tasks to
their piece layout and which chunk each held piece is; it survives restarts and crashes.

The store is a cache: any failure to write it (a full or read-only disk, an I/O error, in the
chunk files or in the index) raises `CannotStore`, which callers take as "do not cache this",
never as a failed read. Opening never fails on a damaged store: what does not belong is moved to
`lost+found/<time>/` and a broken index rebuilt from what it can still vouch for.

Index calls run on the event loop thread (each is tens of microseconds); file I/O runs in worker
threads: new chunk files in the store's own writer thread (`_Writer`), which takes every piece
queued since its last round, writes them in order and wakes the loop once for all of them,
whose index rows are then recorded in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import ids
from common.models import TaskMeta
from common.pieces import valid_piece_size

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
INDEX = "index.db"
_INDEX_FILES = (INDEX, INDEX + "-wal", INDEX + "-shm")
LOST_AND_FOUND = "lost+found"
_CHUNK_FILE = re.compile(r"^[0-9a-f]{64}(\.zst|\.raw)?$")  # a chunk and its sidecars
_TASK_ID = re.compile(r"^(sha256|url):[0-9a-f]{64}$")
_CHUNK_ID = re.compile(r"^blake3:[0-9a-f]{64}$")
_SHOWN = 10  # entries named in the set-aside warning
_INSERT_PIECE = "INSERT OR REPLACE INTO pieces (task_id, idx, chunk, size) VALUES (?, ?, ?, ?)"
WRITER_IDLE = 5.0  # seconds without a chunk to write before the writer thread ends


class ChunkCorrupt(Exception):
    """A stored chunk's bytes no longer hash to its name."""


class CannotStore(Exception):
    """Writing the store or its index failed: cache nothing for a while. `full`: for want of
    space (evicting may help); else read-only or an I/O error (evicting would only lose data).
    `dropped`: tasks an eviction had dropped before it failed."""

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(message)
        self.full = full
        self.dropped: list[str] = []


def _for_want_of_space(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(e, "sqlite_errorname", "") == "SQLITE_FULL"


def _corrupt(e: sqlite3.DatabaseError) -> bool:
    """Whether sqlite says the file itself is broken (not that it cannot be written now)."""
    return getattr(e, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


class _Damaged(Exception):
    """The index failed its integrity check."""


@dataclass(frozen=True, slots=True)
class StoredTask:
    meta: TaskMeta
    pieces: dict[int, str]


class _SetAside:
    """Moves what does not belong in the store to lost+found/<time>/, keeping its path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / LOST_AND_FOUND / time.strftime("%Y%m%dT%H%M%S")
        if self.dir.exists():  # a second start within the second
            self.dir = self.dir.with_name(f"{self.dir.name}-{uuid.uuid4().hex[:6]}")
        self.moved: list[str] = []
        self.stuck: list[str] = []

    def move(self, path: Path, why: str, listed: bool = True) -> bool:
        """Whether it was moved; `listed`: named in the warning (else the caller says it)."""
        rel = path.relative_to(self.root)
        try:
            dest = self.dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, dest)
        except OSError as e:
            self.stuck.append(f"{rel} ({why}; cannot move it: {e.strerror})")
            return False
        if listed:
            self.moved.append(f"{rel} ({why})")
        return True

    def report(self) -> None:
        if self.moved:
            shown = ", ".join(self.moved[:_SHOWN])
            more = f" and {len(self.moved) - _SHOWN} more" if len(self.moved) > _SHOWN else ""
            log.warning("set aside %d unexpected entries of the store in %s: %s%s",
                        len(self.moved), self.dir, shown, more)
        if self.stuck:
            log.warning("%d unexpected entries of the store left in place (ignored): %s",
                        len(self.stuck), ", ".join(self.stuck[:_SHOWN]))


@dataclass(slots=True)
class _Put:
    """A piece on its way into the store: its chunk file written by the writer thread, then
    its index row recorded on the loop."""

    task_id: str
    index: int
    chunk: str
    data: bytes | memoryview
    verify: bool  # hashed first in the writer thread: ChunkCorrupt, nothing written
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None] = field(repr=False)
    written: bool = False  # a new chunk file (not one held already)
    error: BaseException | None = None


class _Writer:
    """One thread that writes chunk files in the order asked. Each round takes every piece
    queued since the last, writes them all, then wakes each asking loop once for the whole
    round (`settle`): the default executor's hand-off per piece (a work item, two chained
    futures, a wake-up each) was ~8 % of a receiving peer's loop in bench/profile_p2p.py. The
    thread ends after WRITER_IDLE seconds without work and starts again on the next piece."""

    def __init__(self, write: Callable[[_Put], None],
                 settle: Callable[[list[_Put]], None]) -> None:
        self._write = write
        self._settle = settle
        self._more = threading.Condition()
        self._queue: list[_Put] = []
        self._running = False
        self._stopping = False

    def submit(self, put: _Put) -> None:
        with self._more:
            self._queue.append(put)
            self._stopping = False
            if self._running:
                self._more.notify()
                return
            self._running = True
        threading.Thread(target=self._run, name="naiad-store-writer", daemon=True).start()

    def stop(self) -> None:
        """End the thread once what is queued is written (the store is closing)."""
        with self._more:
            self._stopping = True
            self._more.notify()

    def _run(self) -> None:
        while True:
            with self._more:
                if not self._queue and not self._stopping:
                    self._more.wait(WRITER_IDLE)
                if not self._queue:
                    self._running = self._stopping = False
                    return
                puts, self._queue = self._queue, []
            rounds: dict[asyncio.AbstractEventLoop, list[_Put]] = {}
            for put in puts:
                try:
                    self._write(put)
                except BaseException as e:  # delivered to the piece's caller
                    put.error = e
                rounds.setdefault(put.loop, []).append(put)
            for loop, done in rounds.items():
                with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits
                    loop.call_soon_threadsafe(self._settle, done)


def _kind(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        return "a directory"
    return "a file" if path.is_file() else "not a regular file"


class ChunkStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        self._db: sqlite3.Connection | None = None
        self.bytes = 0  # of chunk files the index refers to, each distinct chunk once
        # Bytes handed to the writer and not yet in `bytes`: moved from one to the other in
        # one step (`_settle`), so that bytes + unsettled never counts a piece twice (a quota
        # check between a round's settling and its callers resuming evicted a task too many).
        self.unsettled = 0
        # Why nothing can be written until restart (the index opened read-only); None: it can.
        self.read_only: str | None = None
        # With --no-verify-on-serve: (inode, size, mtime) of each chunk file as written or last
        # verified. A file that differs is re-hashed before its bytes are served unverified.
        self.stamping = False
        self._stamps: dict[str, tuple[int, int, int]] = {}
        self._writer = _Writer(self._write_put, self._settle)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Open the store, whatever state it is in. Only a data directory that cannot be
        created raises (OSError)."""
        self.root.mkdir(parents=True, exist_ok=True)
        aside = _SetAside(self.root)
        present = self._prepare(aside)
        self._open_index(aside)
        aside.report()
        if self.read_only is None:
            try:
                self._tidy(present)
            except CannotStore as e:
                log.warning("cannot tidy the store now (%s): it is checked again at the next "
                            "start", e)
        self.bytes = self.cache_bytes()

    def _prepare(self, aside: _SetAside) -> list[str] | None:
        """Make the directories, move aside what does not belong in them, clear tmp/; the
        names of the chunk files present (None: the store cannot be written)."""
        try:
            for d in (self.chunks_dir, self.tmp_dir):
                if d.is_symlink() or (d.exists() and not d.is_dir()):
                    aside.move(d, f"{_kind(d)}, not a directory")
                d.mkdir(exist_ok=True)
            subs = {f"{i:02x}" for i in range(256)}
            for entry in os.scandir(self.chunks_dir):
                if entry.name not in subs or not entry.is_dir(follow_symlinks=False):
                    aside.move(Path(entry.path), _kind(Path(entry.path)))
            present: list[str] = []
            for sub in sorted(subs):
                d = self.chunks_dir / sub
                d.mkdir(exist_ok=True)
                for entry in os.scandir(d):
                    if _CHUNK_FILE.match(entry.name) and entry.name.startswith(sub) \
                            and entry.is_file(follow_symlinks=False):
                        present.append(entry.name)
                    else:
                        aside.move(Path(entry.path), _kind(Path(entry.path)))
            for entry in os.scandir(self.tmp_dir):  # half-written chunks of a crashed run
                if entry.is_dir(follow_symlinks=False):
                    aside.move(Path(entry.path), "a directory")
                else:
                    os.unlink(entry.path)
        except OSError as e:
            log.warning("the store at %s cannot be written (%s): its chunks are served, "
                        "nothing new is cached until it can be", self.root, e)
            self.read_only = f"the store could not be prepared at start-up: {e}"
            return None
        return present

    def _open_index(self, aside: _SetAside) -> None:
        path = self.root / INDEX
        for name in _INDEX_FILES:
            p = self.root / name
            if p.is_symlink() or (p.exists() and not p.is_file()):
                aside.move(p, f"{_kind(p)}, not the index")
        if self.read_only is not None:
            self._open_read_only(path, self.read_only)
            return
        try:
            self._db = self._connect(path)
            return
        except (_Damaged, sqlite3.DatabaseError) as e:
            if isinstance(e, sqlite3.DatabaseError) and not _corrupt(e):
                self._open_read_only(path, f"the index cannot be opened for writing: {e}")
                return
            damage = str(e)
        tasks, pieces = _salvage(path)
        moved = [aside.move(self.root / n, "damaged index", listed=False)
                 for n in _INDEX_FILES if (self.root / n).exists()]
        if not all(moved):
            self._open_read_only(path, f"the damaged index could not be set aside: {damage}")
            return
        try:
            self._db = self._connect(path)
            with self._tx():
                self.db.executemany("INSERT INTO tasks (task_id, length, piece_size, digest) "
                                    "VALUES (?, ?, ?, ?)", tasks)
                self.db.executemany("INSERT OR IGNORE INTO pieces (task_id, idx, chunk, size) "
                                    "VALUES (?, ?, ?, ?)", pieces)
        except (_Damaged, sqlite3.DatabaseError) as e:
            self.close()  # the new index, half filled
            self._open_read_only(path, f"the index cannot be rebuilt: {e}")
            return
        log.warning("%s was damaged (%s): set aside in %s and rebuilt from what it still "
                    "held, %d tasks and %d pieces (unsealed: each is proven again); the rest "
                    "is dropped and, once registered, no longer announced", INDEX, damage,
                    aside.dir, len(tasks), len(pieces))

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        """The index opened for writing, checked and at the current version."""
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise _Damaged("; ".join(problems[:3]))
            db.executescript(_SCHEMA)
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version < SCHEMA_VERSION:
                db.execute("UPDATE tasks SET sealed = 0")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def reopen(self) -> bool:
        """After a start on a store that could not be written: try again to open it for
        writing (the disk came back or has room again); whether it can be written now."""
        if self.read_only is None:
            return True
        try:
            for d in (self.chunks_dir, self.tmp_dir):
                d.mkdir(exist_ok=True)
            for i in range(256):
                (self.chunks_dir / f"{i:02x}").mkdir(exist_ok=True)
            db = self._connect(self.root / INDEX)
        except (OSError, _Damaged, sqlite3.DatabaseError) as e:
            log.debug("the store still cannot be written: %s", e)
            return False
        self.close()
        self._db, self.read_only = db, None
        self.bytes = self.cache_bytes()
        log.info("the store at %s can be written again: caching", self.root)
        return True

    def _open_read_only(self, path: Path, why: str) -> None:
        """Serve what the index lists without writing anything: nothing cached, nothing
        dropped, until `reopen` succeeds. Without a readable index the store is empty."""
        self.read_only = why
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                 isolation_level=None)
            db.execute("SELECT 1 FROM tasks, pieces LIMIT 1").fetchall()
            self._db = db
            held = "the chunks its index lists are served"
        except sqlite3.DatabaseError:
            self.close()
            self._db = sqlite3.connect(":memory:", isolation_level=None)
            self._db.executescript(_SCHEMA)
            held = "nothing is served from it"
        log.warning("%s: %s, nothing new is cached until it can be opened for writing",
                    why, held)

    def _tidy(self, present: list[str] | None) -> None:
        """Start-up checks: index entries without their chunk file dropped, chunk files
        without an index entry removed."""
        with self._writing("tidying the index"):
            self.db.execute("DELETE FROM pieces WHERE task_id NOT IN (SELECT task_id FROM tasks)")
        dropped = self.check(full=False)
        if dropped:
            log.warning("dropped %d index entries whose chunk file is missing or torn", dropped)
        if present is None:
            return
        known = {c.removeprefix(ids.BLAKE3_PREFIX)
                 for (c,) in self.db.execute("SELECT DISTINCT chunk FROM pieces")}
        removed = 0
        with self._writing("removing chunk files no task refers to"):
            for name in present:
                if name.partition(".")[0] not in known:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.chunks_dir / name[:2] / name)
                        removed += 1
        if removed and not known:
            log.warning("the index lists nothing, yet %d chunk files were there (%s lost or "
                        "replaced?): removed them, as nothing vouches for them", removed, INDEX)
        elif removed:
            log.info("removed %d chunk files no task refers to", removed)

    def close(self) -> None:
        self._writer.stop()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write to the store: any failure of the disk or the index is CannotStore."""
        if self.read_only is not None:
            raise CannotStore(f"{what}: {self.read_only}")
        try:
            yield
        except (OSError, sqlite3.DatabaseError) as e:
            raise CannotStore(f"{what}: {e}", full=_for_want_of_space(e)) from e

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """Several statements that apply whole or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self.db.in_transaction:  # sqlite may have rolled back itself (disk full)
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def check(self, full: bool) -> int:
        """Drop index entries whose chunk is missing, of the wrong size, or (full) whose bytes
        do not hash to its name. Returns how many pieces were dropped; CannotStore if they
        could not be."""
        bad: set[str] = set()
        rows = self.db.execute("SELECT DISTINCT chunk, size FROM pieces").fetchall()
        for chunk, size in rows:
            path = self.chunk_path(chunk)
            try:
                if path.stat().st_size != size:
                    bad.add(chunk)
                elif full:
                    self._read_verified(chunk)
            except (OSError, ChunkCorrupt):
                bad.add(chunk)
        return sum(len(self.drop_chunk(c)) for c in bad)

    def free_space(self) -> tuple[int, int] | None:
        """(bytes available, filesystem size) where the store lives; None if unknown."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    # -- chunks ----------------------------------------------------------------------------

    def chunk_path(self, chunk: str) -> Path:
        return Path(self._chunk_name(chunk))

    def _chunk_name(self, chunk: str) -> str:
        """chunk_path as a string: the writer thread's (pathlib's joins were ~4 % of it)."""
        hexd = chunk.removeprefix(ids.BLAKE3_PREFIX)
        return f"{self.chunks_dir}/{hexd[:2]}/{hexd}"

    def packed_path(self, chunk: str) -> Path:
        """The chunk zstd-compressed for the wire, kept beside it once made (peer/wire.py)."""
        return self.chunk_path(chunk).with_suffix(".zst")

    def raw_marker(self, chunk: str) -> Path:
        """An empty file saying the chunk does not compress, as versions before 2026-12-01
        wrote: removed with its chunk (the upload server now remembers that in memory)."""
        return self.chunk_path(chunk).with_suffix(".raw")

    def write_sidecar(self, path: Path, data: bytes) -> None:
        tmp = self._temp_name()
        try:
            _write_new(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _temp_name(self) -> str:
        """A name in tmp/ no other writer uses: this process's id and a counter (a uuid4 per
        chunk cost more than the write's bookkeeping). What a crash leaves there, the start-up
        sweep removes. A string: pathlib's joins were ~4 % of the writer thread's samples."""
        return f"{self.tmp_dir}/{os.getpid()}-{next(_TEMP_NAMES)}.part"

    def has_chunk(self, chunk: str) -> bool:
        return self.chunk_path(chunk).exists()

    def indexed(self, chunk: str) -> bool:
        """Whether some task's piece is this chunk."""
        return self.db.execute("SELECT 1 FROM pieces WHERE chunk = ? LIMIT 1",
                               (chunk,)).fetchone() is not None

    def _write_chunk(self, chunk: str, data: bytes | memoryview) -> bool:
        """Write a chunk file unless it exists; whether it was written. Written under a
        temporary name and renamed into place: stat, open, write, close, rename. (O_TMPFILE
        and linkat, without the stat and the name, measured slower in bench/profile_p2p.py on
        ext4: 3.2 against 2.1 ms of worker CPU per MiB on a cold pull.)"""
        path = self._chunk_name(chunk)
        if os.path.isfile(path):
            return False
        tmp = self._temp_name()
        try:
            st = _write_new(tmp, data, self.stamping)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a read-only disk cannot hold it anyway
                os.unlink(tmp)
            raise
        if st is not None:
            self._stamp(chunk, st)
        return True

    def _stamp(self, chunk: str, st: os.stat_result) -> None:
        self._stamps[chunk] = (st.st_ino, st.st_size, st.st_mtime_ns)

    def unchanged(self, chunk: str) -> bool:
        """Whether the chunk's file is the one this process wrote or last verified: not
        replaced, resized or written to since (media rot it cannot see)."""
        stamp = self._stamps.get(chunk)
        if stamp is None:
            return False
        try:
            st = os.stat(self.chunk_path(chunk))
        except OSError:
            return False
        return (st.st_ino, st.st_size, st.st_mtime_ns) == stamp

    def intact(self, chunk: str) -> bool:
        """Whether the chunk's file is there and hashes to its id."""
        try:
            self._read_verified(chunk)
        except (OSError, ChunkCorrupt):
            return False
        return True

    def _read_verified(self, chunk: str) -> bytes:
        with open(self.chunk_path(chunk), "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        if ids.chunk_id(data) != chunk:
            raise ChunkCorrupt(chunk)
        if self.stamping:
            self._stamp(chunk, st)
        return data

    async def put_piece(self, task_id: str, index: int, chunk: str,
                        data: bytes | memoryview, verify: bool = False) -> None:
        """Store verified bytes as `chunk` and record them as piece `index` of the task;
        CannotStore if either write fails (then neither is kept). With `verify` the bytes are
        hashed first, in the same hand-off as the write (nothing is stored unless they are
        `chunk`: else ChunkCorrupt). A caller cancelled meanwhile leaves the piece stored and
        indexed, or neither."""
        with self._writing(f"storing piece {index} of {task_id}"):
            loop = asyncio.get_running_loop()
            put = _Put(task_id, index, chunk, data, verify, loop, loop.create_future())
            self.unsettled += len(data)
            try:
                self._writer.submit(put)
            except BaseException:
                self.unsettled -= len(data)
                raise
            await put.done

    def _write_put(self, put: _Put) -> None:
        """In the writer thread."""
        if put.verify and ids.chunk_id(put.data) != put.chunk:
            raise ChunkCorrupt(put.chunk)
        put.written = self._write_chunk(put.chunk, put.data)

    def _settle(self, puts: list[_Put]) -> None:
        """On the loop, for a round of the writer's: the index rows of the pieces written,
        in one transaction, then each piece's caller answered."""
        self.unsettled -= sum(len(p.data) for p in puts)
        kept = [p for p in puts if p.error is None]
        rows = [(p.task_id, p.index, p.chunk, len(p.data)) for p in kept]
        try:
            if len(rows) == 1:
                self.db.execute(_INSERT_PIECE, rows[0])
            elif rows:
                with self._tx():
                    self.db.executemany(_INSERT_PIECE, rows)
        except Exception as e:  # sqlite's, or the store closed meanwhile: told to each caller
            for p in kept:
                p.error = e
            with contextlib.suppress(Exception):  # else the start-up check removes them
                for p in kept:
                    if p.written and not self.indexed(p.chunk):  # no row names the file
                        self._unlink(p.chunk, 0)
        else:
            self.bytes += sum(len(p.data) for p in kept if p.written)
        for p in puts:
            if p.done.done():  # its caller was cancelled: stored (or not) all the same
                continue
            if p.error is None:
                p.done.set_result(None)
            else:
                p.done.set_exception(p.error)

    async def read_chunk(self, chunk: str, verify: bool) -> bytes:
        """The chunk's bytes; with `verify`, re-hashed first (raises ChunkCorrupt). Unverified
        only when the file is unchanged since written or verified (with `stamping`)."""
        if verify or (self.stamping and not self.unchanged(chunk)):
            return await asyncio.to_thread(self._read_verified, chunk)
        return await asyncio.to_thread(self.chunk_path(chunk).read_bytes)

    def drop_chunk(self, chunk: str) -> list[tuple[str, int]]:
        """Forget a chunk everywhere (it failed verification); returns the pieces it was. The
        file goes first, so bad bytes are never served again even if the index cannot be
        written (then CannotStore, and the start-up check drops the entries)."""
        rows = self.db.execute("SELECT task_id, idx, size FROM pieces WHERE chunk = ?",
                               (chunk,)).fetchall()
        self._unlink(chunk, rows[0][2] if rows else 0)
        with self._writing(f"dropping chunk {chunk}"), self._tx():
            self.db.execute("DELETE FROM pieces WHERE chunk = ?", (chunk,))
            self.db.executemany("UPDATE tasks SET sealed = 0 WHERE task_id = ?",
                                [(t,) for t in {r[0] for r in rows}])
        return [(r[0], r[1]) for r in rows]

    def _unlink(self, chunk: str, size: int) -> None:
        """Remove a chunk's files, as far as the disk lets us."""
        self._stamps.pop(chunk, None)
        for sidecar in (self.packed_path(chunk), self.raw_marker(chunk)):
            with contextlib.suppress(OSError):
                sidecar.unlink(missing_ok=True)
        try:
            self.chunk_path(chunk).unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cannot remove chunk file %s: %s", self.chunk_path(chunk), e)
            return
        self.bytes -= size

    # -- tasks -----------------------------------------------------------------------------

    def put_task(self, meta: TaskMeta) -> bool:
        """Record a task unless known; whether the index holds it with this layout (pieces of
        another layout must not be stored under it). CannotStore if it cannot be written."""
        with self._writing(f"recording task {meta.task_id}"):
            # Recorded now is used now: a task fetched and never read since (a preheat, a
            # seed's) must not sort before every task touched once for eviction.
            self.db.execute(
                "INSERT INTO tasks (task_id, length, piece_size, digest, sealed, last_access) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(task_id) DO NOTHING",
                (meta.task_id, meta.length, meta.piece_size, meta.digest, int(meta.sealed),
                 time.time()))
        held = self.task(meta.task_id)
        return held is not None and (held.length, held.piece_size) == \
            (meta.length, meta.piece_size)

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
        with self._writing(f"sealing {task_id}"):
            self.db.execute("UPDATE tasks SET sealed = 1 WHERE task_id = ?", (task_id,))

    def touch(self, task_id: str, now: float) -> None:
        with self._writing(f"touching {task_id}"):
            self.db.execute("UPDATE tasks SET last_access = ? WHERE task_id = ?",
                            (now, task_id))

    def drop_task(self, task_id: str) -> None:
        """Forget a task and delete the chunks no other task uses. The files go first: that
        frees the room the index of a full disk may need to record it. If it cannot
        (CannotStore) its entries stay, naming files now gone, as after a crash: reads of
        them fail over to fetching, and the start-up check drops them."""
        with self._writing(f"dropping task {task_id}"):
            chunks = self.db.execute("SELECT chunk, size FROM pieces WHERE task_id = ?",
                                     (task_id,)).fetchall()
            for chunk, size in dict(chunks).items():
                if self.db.execute("SELECT 1 FROM pieces WHERE chunk = ? AND task_id != ? "
                                   "LIMIT 1", (chunk, task_id)).fetchone() is None:
                    self._unlink(chunk, size)
            with self._tx():
                self.db.execute("DELETE FROM pieces WHERE task_id = ?", (task_id,))
                self.db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))

    def evict(self, target: int, busy: set[str]) -> list[str]:
        """Drop least recently used tasks, never one in `busy`, until the store holds at most
        `target` bytes; the tasks dropped (CannotStore: its `dropped` were)."""
        dropped: list[str] = []
        for (task_id,) in self.db.execute(
                "SELECT task_id FROM tasks ORDER BY last_access, task_id").fetchall():
            if self.bytes <= target:
                break
            if task_id not in busy:
                try:
                    self.drop_task(task_id)
                except CannotStore as e:
                    e.dropped = dropped
                    raise
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


_TEMP_NAMES = itertools.count()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_new(path: str | Path, data: bytes | memoryview,
               stat: bool = False) -> os.stat_result | None:
    """Create `path` (it must not exist) holding `data`; its stat if asked."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        return os.fstat(fd) if stat else None
    finally:
        os.close(fd)


def _readable_rows(db: sqlite3.Connection, table: str, columns: str) -> list[tuple]:
    """The rows of a damaged table that can still be read, in rowid order: past a page that
    cannot be read, the scan starts again further on, ever further (1, 2, 4... rowids) until
    it lands on one that can."""
    rows: list[tuple] = []
    after, step = 0, 1
    for _ in range(62):  # rowids are below 2^63
        try:
            for row in db.execute(f"SELECT rowid, {columns} FROM {table} WHERE rowid > ? "
                                  "ORDER BY rowid", (after,)):
                rows.append(tuple(row[1:]))
                after, step = row[0], 1
            return rows
        except sqlite3.Error:
            after, step = after + step, step * 2
    return rows


def _salvage(path: Path) -> tuple[list[tuple], list[tuple]]:
    """The task and piece rows a damaged index still yields, each checked for shape: rows of
    tasks, then of pieces of those tasks. Seals are not kept (they are proven again)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        # Else a file shorter than its header says is refused whole, even the schema.
        db.execute("PRAGMA writable_schema = ON")
    except sqlite3.Error:
        return [], []
    try:
        tasks = _readable_rows(db, "tasks", "task_id, length, piece_size, digest")
        pieces = _readable_rows(db, "pieces", "task_id, idx, chunk, size")
    finally:
        db.close()
    layouts = {}
    for task_id, length, piece_size, digest in tasks:
        if isinstance(task_id, str) and _TASK_ID.match(task_id) and isinstance(length, int) \
                and length >= 0 and isinstance(piece_size, int) \
                and valid_piece_size(piece_size) and (digest is None or isinstance(digest, str)):
            layouts[task_id] = (length, piece_size, digest)
    good = [(t, idx, c, size) for t, idx, c, size in pieces
            if t in layouts and isinstance(idx, int) and isinstance(size, int)
            and idx >= 0 and 0 < size <= layouts[t][1]
            and idx * layouts[t][1] < layouts[t][0]
            and isinstance(c, str) and _CHUNK_ID.match(c)]
    return [(t, *v) for t, v in layouts.items()], good
