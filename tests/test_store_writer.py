"""The peer store's writer thread (peer/store.py `_Writer`): pieces queued meanwhile are written
in one round, their index rows recorded in one transaction, each caller answered; a failed
index write fails every piece of its round and leaves no file without its row; a caller
cancelled meanwhile leaves its piece stored and indexed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from common import ids
from common.models import TaskMeta
from peer import store as store_module
from peer.store import CannotStore, ChunkStore

PIECE = 1 << 16


def _meta(pieces: int) -> TaskMeta:
    return TaskMeta(task_id=f"sha256:{7:064x}", length=pieces * PIECE, piece_size=1 << 20)


@pytest.fixture
def store(tmp_path: Path) -> ChunkStore:
    s = ChunkStore(tmp_path / "store")
    s.open()
    yield s  # type: ignore[misc]
    s.close()


def _counting_rounds(store: ChunkStore) -> list[int]:
    rounds: list[int] = []
    settle = store._settle

    def counted(puts: list) -> None:  # type: ignore[type-arg]
        rounds.append(len(puts))
        settle(puts)

    store._writer._settle = counted  # type: ignore[method-assign]
    return rounds


async def test_pieces_queued_together_are_written_in_few_rounds(store: ChunkStore) -> None:
    meta = _meta(64)
    store.put_task(meta)
    rounds = _counting_rounds(store)
    blobs = [os.urandom(PIECE) for _ in range(64)]
    await asyncio.gather(*(store.put_piece(meta.task_id, i, ids.chunk_id(b), b)
                           for i, b in enumerate(blobs)))
    assert sum(rounds) == 64 and len(rounds) < 64, rounds  # queued while it wrote: batched
    assert store.pieces(meta.task_id) == {i: ids.chunk_id(b) for i, b in enumerate(blobs)}
    assert store.bytes == 64 * PIECE == store.cache_bytes()
    for b in blobs:
        assert store.chunk_path(ids.chunk_id(b)).read_bytes() == b
    # The same chunk again (another piece of the same bytes) is not a second file or count.
    await store.put_piece(meta.task_id, 0, ids.chunk_id(blobs[0]), blobs[0])
    assert store.bytes == 64 * PIECE


async def test_a_failed_index_write_fails_its_whole_round_and_keeps_no_file(
        store: ChunkStore) -> None:
    meta = _meta(400)
    store.put_task(meta)
    (pages,) = store.db.execute("PRAGMA page_count").fetchone()
    store.db.execute(f"PRAGMA max_page_count = {pages + 1}")
    blobs = [os.urandom(PIECE) for _ in range(400)]
    results = await asyncio.gather(*(store.put_piece(meta.task_id, i, ids.chunk_id(b), b)
                                     for i, b in enumerate(blobs)), return_exceptions=True)
    failed = [i for i, r in enumerate(results) if isinstance(r, CannotStore)]
    assert failed and all(r is None or isinstance(r, CannotStore) for r in results)
    assert all(isinstance(results[i], CannotStore) and results[i].full for i in failed)
    held = store.pieces(meta.task_id)
    assert sorted(held) == [i for i, r in enumerate(results) if r is None]
    for i in failed:
        assert not store.chunk_path(ids.chunk_id(blobs[i])).exists(), "a file without its row"
    assert store.bytes == len(held) * PIECE == store.cache_bytes()


async def test_a_cancelled_caller_leaves_its_piece_stored_and_indexed(
        store: ChunkStore) -> None:
    meta = _meta(1)
    store.put_task(meta)
    data = os.urandom(PIECE)
    put = asyncio.create_task(store.put_piece(meta.task_id, 0, ids.chunk_id(data), data))
    await asyncio.sleep(0)  # queued
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    await store.put_piece(meta.task_id, 0, ids.chunk_id(data), data)  # after it, in order
    assert store.pieces(meta.task_id) == {0: ids.chunk_id(data)}
    assert store.bytes == PIECE == store.cache_bytes()


async def test_the_writer_thread_ends_when_idle_and_starts_again(
        store: ChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "WRITER_IDLE", 0.05)
    meta = _meta(2)
    store.put_task(meta)
    first, second = os.urandom(PIECE), os.urandom(PIECE)
    await store.put_piece(meta.task_id, 0, ids.chunk_id(first), first)
    for _ in range(200):  # until it has ended
        if not store._writer._running:
            break
        await asyncio.sleep(0.01)
    assert not store._writer._running
    await store.put_piece(meta.task_id, 1, ids.chunk_id(second), second)
    assert len(store.pieces(meta.task_id)) == 2


async def test_closing_the_store_ends_its_writer_thread(store: ChunkStore) -> None:
    meta = _meta(1)
    store.put_task(meta)
    data = os.urandom(PIECE)
    await store.put_piece(meta.task_id, 0, ids.chunk_id(data), data)
    assert store._writer._running  # idle for WRITER_IDLE (5 s) before it would end alone
    store.close()
    for _ in range(100):  # well within WRITER_IDLE
        if not store._writer._running:
            break
        await asyncio.sleep(0.01)
    assert not store._writer._running


async def test_a_piece_is_counted_once_between_its_round_settling_and_its_caller_resuming(
        store: ChunkStore) -> None:
    """bytes + unsettled is what the quota check sees of the writes under way: a piece is in
    one or the other, never both and never neither (a check that ran after a round settled
    and before its callers resumed saw the round twice and evicted a task too many)."""
    meta = _meta(8)
    store.put_task(meta)
    blobs = [os.urandom(PIECE) for _ in range(8)]
    puts = [asyncio.create_task(store.put_piece(meta.task_id, i, ids.chunk_id(b), b))
            for i, b in enumerate(blobs)]
    await asyncio.sleep(0)  # each put handed to the writer
    seen = set()
    while not all(p.done() for p in puts):
        assert store.bytes + store.unsettled == 8 * PIECE
        seen.add(store.bytes)
        await asyncio.sleep(0)
    await asyncio.gather(*puts)
    assert store.unsettled == 0 and store.bytes == 8 * PIECE
    assert 8 * PIECE in seen or len(seen) > 1  # the loop did see rounds settle
