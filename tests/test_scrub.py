"""The scrubber re-hashes stored chunks only once the peer has had no transfer for a while: the
moments between the pieces of a pull are not idleness (scrubbing in them cost the lab's peers
a fifth of their CPU).

Driven by a fake clock: time moves only when the test moves it, so "not yet" and "now" are
exact instants, not wall-clock sleeps. Its values are binary fractions, exact in floats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common import ids
from common.models import TaskMeta
from common.tasks import Activity
from peer import scrub
from peer.scrub import Scrubber
from peer.store import ChunkStore
from tests.cluster import until

QUIET = 0.25
BUSY = 1 / 16  # a piece being fetched
GAP = 1 / 64  # between two pieces


class FakeClock:
    """Monotonic seconds that move only by `advance`; `sleep` returns once they have passed."""

    def __init__(self) -> None:
        self.now = 100.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, fut))
        try:
            await fut
        finally:
            self._sleepers = [s for s in self._sleepers if s[1] is not fut]

    def wake_ups(self) -> list[float]:
        """When the sleepers still waiting will wake."""
        return sorted(at for at, fut in self._sleepers if not fut.done())

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for at, fut in self._sleepers:
            if at <= self.now and not fut.done():
                fut.set_result(None)


async def asleep(clock: FakeClock) -> float:
    """Let the scrubber run until it sleeps on the clock; when it will wake. It does no I/O on
    its way there, so a few turns of the loop are enough."""
    for _ in range(100):
        if clock.wake_ups():
            return clock.wake_ups()[0]
        await asyncio.sleep(0)
    raise AssertionError("the scrubber never waited for quiet")


@pytest.fixture
async def scrubbing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(scrub, "QUIET_SECONDS", QUIET)
    store = ChunkStore(tmp_path)
    store.open()
    meta = TaskMeta(task_id=f"sha256:{1:064x}", length=4096, piece_size=4096)
    store.put_task(meta)
    data = b"x" * 4096
    await store.put_piece(meta.task_id, 0, ids.chunk_id(data), data)
    clock = FakeClock()
    transfer = Activity(clock)
    scrubber = Scrubber(store, None, rate=1 << 30, parts=[transfer],  # type: ignore[arg-type]
                        sleep=clock.sleep)
    transfer.set_busy(True)  # a pull under way when the scrubber starts
    task = asyncio.create_task(scrubber.run())
    yield scrubber, transfer, clock
    task.cancel()
    store.close()


def test_activity_counts_quiet_time_from_the_end_of_the_work() -> None:
    clock = FakeClock()
    a = Activity(clock)
    clock.advance(1.0)
    assert a.quiet_for() == 1.0, "idle since it was made"
    a.set_busy(True)
    clock.advance(1.0)
    assert a.quiet_for() == 0.0 and not a.idle.is_set()
    a.set_busy(False)
    assert a.idle.is_set() and a.quiet_for() == 0.0
    clock.advance(0.5)
    a.set_busy(False)  # still idle: the quiet time does not restart
    clock.advance(0.25)
    assert a.quiet_for() == 0.75


async def test_scrubber_waits_for_a_quiet_peer(scrubbing) -> None:
    scrubber, transfer, clock = scrubbing
    # A pull whose pieces leave short gaps, for four times QUIET in all: never quiet for
    # QUIET. The scrubber sees every gap (it runs until it sleeps) and scrubs in none.
    for _ in range(12):
        clock.advance(BUSY)
        transfer.set_busy(False)
        await asleep(clock)  # it saw the gap begin
        clock.advance(GAP)
        await asleep(clock)  # and, if it woke in the gap, went back to sleep
        transfer.set_busy(True)
        assert scrubber.checked == 0, "scrubbed between two pieces of a pull"
    assert clock.now - 100.0 == 12 * (BUSY + GAP) > 3 * QUIET
    transfer.set_busy(False)
    ended = clock.now
    # Whatever it slept for before, it now wakes exactly QUIET after the work ended.
    while (wake := await asleep(clock)) < ended + QUIET:
        assert scrubber.checked == 0
        clock.advance(wake - clock.now)
    assert wake == ended + QUIET
    clock.advance(ended + QUIET - 1 / 1024 - clock.now)
    assert await asleep(clock) == ended + QUIET and scrubber.checked == 0, "scrubbed too early"
    clock.advance(1 / 1024)

    async def scrubbed() -> bool:
        return scrubber.checked >= 1

    await until(scrubbed, 5, "the scrubber checking the chunk once the peer is quiet")
    assert clock.now == ended + QUIET
