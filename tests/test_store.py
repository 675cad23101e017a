"""The chunk store on a real filesystem: whole chunks only, an index that survives, start-up
checks that drop what is torn or missing, byte accounting, LRU eviction that spares busy tasks."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from common import ids
from common.models import TaskMeta
from peer.store import ChunkCorrupt, ChunkStore

MiB = 1 << 20


def _task(n: int, pieces: int = 2, size: int = 1000) -> TaskMeta:
    return TaskMeta(task_id=f"sha256:{n:064x}", length=pieces * size, piece_size=size)


async def _fill(store: ChunkStore, meta: TaskMeta, seed: int) -> list[str]:
    store.put_task(meta)
    chunks = []
    for i in range(meta.length // meta.piece_size):
        data = bytes([seed, i]) * (meta.piece_size // 2)
        chunk = ids.chunk_id(data)
        await store.put_piece(meta.task_id, i, chunk, data)
        chunks.append(chunk)
    return chunks


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    s = ChunkStore(tmp_path / "store")
    s.open()
    yield s
    s.close()


async def test_pieces_survive_reopen_and_bytes_are_counted_once(
        store: ChunkStore, tmp_path: Path) -> None:
    a = await _fill(store, _task(1), seed=1)
    # A second task made of the same bytes shares the chunk files.
    await _fill(store, _task(2), seed=1)
    assert store.bytes == 2000
    store.close()
    again = ChunkStore(tmp_path / "store")
    again.open()
    assert again.pieces(_task(1).task_id) == {0: a[0], 1: a[1]}
    assert again.bytes == 2000
    assert await again.read_chunk(a[0], verify=True) == bytes([1, 0]) * 500
    again.drop_task(_task(1).task_id)
    assert again.bytes == 2000, "the other task still uses the chunks"
    again.drop_task(_task(2).task_id)
    assert again.bytes == 0 and not again.chunk_path(a[0]).exists()
    again.close()


async def test_start_up_drops_torn_and_missing_chunks_and_leftovers(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "s")
    store.open()
    chunks = await _fill(store, _task(1, pieces=3), seed=7)
    store.close()
    with open(store.chunk_path(chunks[0]), "r+b") as f:
        f.truncate(10)  # torn by a crash mid-write
    store.chunk_path(chunks[1]).unlink()
    (store.tmp_dir / "dead.part").write_bytes(b"half a chunk")
    orphan = ids.chunk_id(b"never indexed")
    store.chunk_path(orphan).write_bytes(b"never indexed")

    store.open()
    assert store.pieces(_task(1).task_id) == {2: chunks[2]}
    assert list(store.tmp_dir.iterdir()) == []
    assert not store.chunk_path(orphan).exists()
    assert store.bytes == 1000
    store.close()


async def test_full_check_and_verified_reads_catch_rot(store: ChunkStore) -> None:
    chunks = await _fill(store, _task(1), seed=3)
    path = store.chunk_path(chunks[1])
    data = bytearray(path.read_bytes())
    data[17] ^= 1
    path.write_bytes(bytes(data))  # same size: the cheap check cannot see it
    assert store.check(full=False) == 0
    assert await store.read_chunk(chunks[1], verify=False) == bytes(data)
    with pytest.raises(ChunkCorrupt):
        await store.read_chunk(chunks[1], verify=True)
    assert store.check(full=True) == 1
    assert store.pieces(_task(1).task_id) == {0: chunks[0]}


async def test_evict_least_recently_used_never_busy(store: ChunkStore) -> None:
    for n in (1, 2, 3, 4):
        await _fill(store, _task(n), seed=n)
        store.touch(_task(n).task_id, float(n))
    assert store.bytes == 8000
    dropped = store.evict(target=4000, busy={_task(1).task_id})
    assert dropped == [_task(2).task_id, _task(3).task_id]
    assert store.bytes == 4000
    assert store.task(_task(1).task_id) is not None  # oldest, but being read
    assert store.evict(target=0, busy={_task(1).task_id, _task(4).task_id}) == []


async def test_a_task_recorded_and_not_read_since_is_as_recent_as_its_recording(
        store: ChunkStore) -> None:
    """Last used when recorded: a task fetched without a reader (a preheat) is evicted after
    one read before it, not first."""
    await _fill(store, _task(1), seed=1)
    store.touch(_task(1).task_id, time.time() - 100)
    await _fill(store, _task(2), seed=2)  # recorded now, never touched
    assert store.evict(target=2000, busy=set()) == [_task(1).task_id]


async def test_scrub_cursor_walks_every_chunk_once(store: ChunkStore) -> None:
    for n in range(5):
        await _fill(store, _task(n), seed=n)
    seen, cursor = [], ""
    while batch := store.chunks_after(cursor, 3):
        seen += [c for c, _ in batch]
        cursor = batch[-1][0]
    assert sorted(seen) == seen and len(seen) == len(set(seen)) == 10


async def test_index_is_a_real_sqlite_database(store: ChunkStore) -> None:
    await _fill(store, _task(9), seed=9)
    db = sqlite3.connect(store.root / "index.db")
    assert db.execute("SELECT COUNT(*) FROM pieces").fetchone()[0] == 2
    db.close()
    assert os.path.getsize(store.root / "index.db") > 0


async def test_seals_of_an_older_index_are_forgotten_once_ours_kept(tmp_path: Path) -> None:
    """Before index version 2 a peer copied `sealed` from the scheduler's word: an upgraded
    peer must prove such a blob itself again, while its own later seals survive restarts."""
    old = ChunkStore(tmp_path / "store")
    old.open()
    meta = _task(7)
    await _fill(old, meta, seed=7)
    old.mark_sealed(meta.task_id)
    old.db.execute("PRAGMA user_version = 0")  # as an index written by an older naiad
    old.close()
    upgraded = ChunkStore(tmp_path / "store")
    upgraded.open()
    assert upgraded.task(meta.task_id).sealed is False
    assert len(upgraded.pieces(meta.task_id)) == 2, "the chunks themselves are kept"
    upgraded.mark_sealed(meta.task_id)
    upgraded.close()
    again = ChunkStore(tmp_path / "store")
    again.open()
    assert again.task(meta.task_id).sealed is True
    again.close()


async def test_chunk_writes_leave_whole_files_or_nothing(
        store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk is stored once (a second write of it is not counted), leaves nothing in tmp/,
    and a write that fails halfway leaves neither the chunk nor its temporary file behind."""
    store.stamping = True
    data = os.urandom(MiB)
    chunk = ids.chunk_id(data)
    assert store._write_chunk(chunk, data) is True
    assert store._write_chunk(chunk, data) is False, "a chunk held already is not counted twice"
    assert store.chunk_path(chunk).read_bytes() == data and store.unchanged(chunk)
    assert list(store.tmp_dir.iterdir()) == []

    real_write = os.write

    def half_then_full(fd: int, view: bytes | memoryview) -> int:
        if len(view) < MiB:
            raise OSError(28, "No space left on device")
        return real_write(fd, view[:len(view) // 2])

    monkeypatch.setattr(os, "write", half_then_full)
    other = os.urandom(MiB)
    with pytest.raises(OSError):
        store._write_chunk(ids.chunk_id(other), other)
    monkeypatch.undo()
    assert not store.chunk_path(ids.chunk_id(other)).exists()
    assert list(store.tmp_dir.iterdir()) == []
