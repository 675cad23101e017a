"""The scrubber re-hashes stored chunks only once the peer has had no transfer for a while: the
moments between the pieces of a pull are not idleness (scrubbing in them cost the lab's peers
a fifth of their CPU)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from common import ids
from common.models import TaskMeta
from common.tasks import Activity
from peer import scrub
from peer.scrub import Scrubber
from peer.store import ChunkStore
from tests.cluster import until

QUIET = 0.3


@pytest.fixture
async def scrubbing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(scrub, "QUIET_SECONDS", QUIET)
    store = ChunkStore(tmp_path)
    store.open()
    meta = TaskMeta(task_id=f"sha256:{1:064x}", length=4096, piece_size=4096)
    store.put_task(meta)
    data = b"x" * 4096
    await store.put_piece(meta.task_id, 0, ids.chunk_id(data), data)
    transfer = Activity()
    scrubber = Scrubber(store, None, rate=1 << 30, parts=[transfer])  # type: ignore[arg-type]
    task = asyncio.create_task(scrubber.run())
    yield scrubber, transfer
    task.cancel()
    store.close()


def test_activity_counts_quiet_time_from_the_end_of_the_work() -> None:
    a = Activity()
    a.set_busy(True)
    assert a.quiet_for() == 0.0 and not a.idle.is_set()
    a.set_busy(False)
    assert a.idle.is_set() and 0.0 <= a.quiet_for() < 0.1
    before = a.quiet_for()
    a.set_busy(False)  # still idle: the quiet time does not restart
    assert a.quiet_for() >= before


async def test_scrubber_waits_for_a_quiet_peer(scrubbing) -> None:
    scrubber, transfer = scrubbing
    transfer.set_busy(True)
    # A pull whose pieces leave gaps of 50 ms: never quiet for QUIET seconds.
    for _ in range(12):
        await asyncio.sleep(0.05)
        transfer.set_busy(False)
        await asyncio.sleep(0.01)
        transfer.set_busy(True)
    assert scrubber.checked == 0
    transfer.set_busy(False)
    ended = time.monotonic()

    async def scrubbed() -> bool:
        return scrubber.checked >= 1

    await until(scrubbed, 5, "the scrubber checking the chunk once the peer is quiet")
    assert time.monotonic() - ended >= QUIET * 0.9
