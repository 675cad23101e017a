"""The reader's read-ahead: a wide window of pieces asked for, only the near ones held in memory
(far ones stored are let go and read back from the store), pieces passing through uncached kept
until reached. Runs the real engine against the in-process fakes of test_engine_pull."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.limits import DEFAULT, ON_DEMAND
from common.pieces import MiB
from common.ranges import ByteRange
from peer.engine import reader
from peer.engine.reader import holds, local_ahead, readahead_pieces
from peer.engine.run import TaskRun
from tests.cluster import until
from tests.test_engine_pull import PIECE, World, make_world

COUNT = 24


def test_the_window_is_pieces_in_flight_bounded_in_bytes() -> None:
    assert readahead_pieces(4 * MiB) == 16, "a fast link's pieces in flight"
    assert readahead_pieces(1 * MiB) == 16, "small pieces: as many, not 64 MiB of them"
    assert readahead_pieces(16 * MiB) == reader.READAHEAD_MIN_PIECES == 4
    assert readahead_pieces(4 * MiB, 128 * MiB) == 32, "the sim's --readahead"


def test_only_near_or_unstored_pieces_are_held() -> None:
    near = reader.HELD_BYTES // MiB
    assert local_ahead(1 * MiB) == reader.LOCAL_AHEAD_BYTES // MiB
    assert holds(near - 1, stored=True, piece_size=MiB)
    assert not holds(near, stored=True, piece_size=MiB)
    assert holds(10 * near, stored=False, piece_size=MiB)


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    # Test-sized: 2 pieces held near the reader, the whole blob asked for at once.
    monkeypatch.setattr(reader, "HELD_BYTES", 2 * PIECE)
    monkeypatch.setattr(reader, "PIECE_FLOOR", PIECE)
    w = make_world(tmp_path, COUNT * PIECE)
    assert readahead_pieces(PIECE) >= COUNT
    yield w
    await w.engine.close()
    w.store.close()


class Watched:
    """The futures the reader gets from `ensure`, by piece, as weak references: dead once
    nobody holds the piece's bytes."""

    def __init__(self, world: World) -> None:
        self.refs: dict[int, weakref.ref[asyncio.Future[bytes]]] = {}
        ensure = world.engine.reader.ensure

        def watching(run: TaskRun, index: int, priority: int) -> asyncio.Future[bytes] | None:
            fut = ensure(run, index, priority)
            if fut is not None:
                self.refs.setdefault(index, weakref.ref(fut))
            return fut

        world.engine.reader.ensure = watching

    def alive(self) -> set[int]:
        gc.collect()
        return {i for i, ref in self.refs.items() if ref() is not None}


async def paused_after_first_piece(world: World, run: TaskRun, arrived: int
                                   ) -> tuple[bytearray, AsyncIterator[memoryview]]:
    """Start a whole read, take its first piece, and wait (not reading) until `arrived` pieces
    of the rest have come in."""
    views = aiter(world.engine.read(run, ByteRange(0, len(world.blob.data) - 1),
                                    world.blob.digest))
    got = bytearray(await anext(views))

    async def in_() -> bool:
        return len(world.parents.fetches) >= arrived and not run.inflight
    await until(in_, 10, "the read-ahead fetched")
    await asyncio.sleep(0)  # one turn of the loop: the futures' done callbacks (the reader's)
    return got, views


async def test_far_pieces_fetched_ahead_are_stored_not_held_and_read_back(world: World) -> None:
    watched = Watched(world)
    run = await world.open()
    got, views = await paused_after_first_piece(world, run, COUNT)
    assert len(run.have) == COUNT
    assert world.engine.reader.held_bytes == PIECE, "the next piece is held (2 near: 0, 1)"
    assert watched.alive() <= {0, 1}, "far pieces' bytes were let go (0 is being served)"
    async with contextlib.aclosing(views):  # type: ignore[type-var]
        async for view in views:
            got += view
    assert bytes(got) == world.blob.data
    assert world.engine.reader.held_bytes == 0
    assert world.downloaded("peer") == len(world.blob.data)
    assert world.downloaded("local") == 0, "read back, not counted a second time"
    assert len(world.parents.fetches) == COUNT, "nothing fetched twice"


async def test_a_far_piece_altered_at_rest_is_caught_when_read_back(world: World) -> None:
    """Verify-on-serve re-hashes a far piece read back even though this read fetched it: an
    in-place rewrite with its mtime put back passes a stat stamp, not the hash."""
    run = await world.open()
    got, views = await paused_after_first_piece(world, run, COUNT)
    far = COUNT - 1
    path = world.store.chunk_path(run.have[far])
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\xff" * 16)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    async with contextlib.aclosing(views):  # type: ignore[type-var]
        async for view in views:
            got += view
    assert bytes(got) == world.blob.data, "the altered bytes never reached the reader"
    assert len(world.parents.fetches) == COUNT + 1, "the altered piece was fetched again"


async def test_pieces_passing_through_uncached_are_held_until_reached(world: World) -> None:
    world.store.full = True
    watched = Watched(world)
    run = await world.open()
    got, views = await paused_after_first_piece(world, run, COUNT)
    assert run.have == {}
    assert world.engine.reader.held_bytes == (COUNT - 1) * PIECE
    assert watched.alive() == set(range(COUNT)), "the only copy is the reader's (0 served)"
    async with contextlib.aclosing(views):  # type: ignore[type-var]
        async for view in views:
            got += view
    assert bytes(got) == world.blob.data
    assert world.engine.reader.held_bytes == 0
    assert len(world.parents.fetches) == COUNT


# -- the ask order: a whole read's far share ------------------------------------------------

def test_a_whole_read_keeps_three_quarters_of_a_window_far_a_ranged_read_none() -> None:
    assert reader.split_window(16, whole=True) == (16, 16 * reader.FAR_SHARE // 4)
    assert reader.split_window(16, whole=True, far_share=3) == (16, 12)
    assert reader.split_window(16, whole=False, far_share=3) == (16, 0), "nydusd's: in order"
    assert reader.split_window(4, whole=True, far_share=3) == (4, 3)


class Asks:
    """The reader's `ensure` calls in order, as (piece, priority)."""

    def __init__(self, world: World) -> None:
        self.calls: list[tuple[int, int]] = []
        ensure = world.engine.reader.ensure

        def asking(run: TaskRun, index: int, priority: int) -> asyncio.Future[bytes] | None:
            self.calls.append((index, priority))
            return ensure(run, index, priority)

        world.engine.reader.ensure = asking

    def pieces(self) -> list[int]:
        return [i for i, _ in self.calls]


class StartAt:
    """The reader's rng, drawing the far cursor's start."""

    def __init__(self, index: int) -> None:
        self.index = index

    def randrange(self, n: int) -> int:
        return self.index % n


@pytest.fixture
def window8(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """A window of 8 pieces in order and 6 far, over the 24 of the blob (the far share on)."""
    monkeypatch.setattr(reader, "readahead_pieces", lambda size, readahead=0: 8)
    monkeypatch.setattr(reader, "FAR_SHARE", 3)
    return reader.split_window(8, whole=True)


async def test_a_whole_read_asks_its_far_share_from_its_drawn_start(
        world: World, window8: tuple[int, int]) -> None:
    near, far = window8
    world.engine.reader.rng = StartAt(COUNT - 3)  # type: ignore[assignment]
    asks = Asks(world)
    run = await world.open()
    got, views = await paused_after_first_piece(world, run, COUNT)
    assert asks.pieces()[:near + far] == [*range(8), 21, 22, 23, 8, 9, 10], \
        "in order what the client reads next, then from the drawn start, round to the first"
    assert world.scheduler.calls[0][0] == asks.pieces()[:near + far], "in one batch"
    assert len(run.have) == COUNT, "topped up as they came in, the reader standing still"
    assert world.engine.reader.held_bytes <= reader.HELD_BYTES, "far pieces are not held"
    async with contextlib.aclosing(views):  # type: ignore[type-var]
        async for view in views:
            got += view
    assert bytes(got) == world.blob.data
    assert len(world.parents.fetches) == COUNT, "nothing fetched twice"
    assert world.downloaded("peer") == len(world.blob.data)
    assert world.downloaded("local") == 0, "far pieces read back are not counted again"


async def test_far_pieces_are_never_asked_as_on_demand(
        world: World, window8: tuple[int, int]) -> None:
    near, far = window8
    world.engine.reader.rng = StartAt(10)  # type: ignore[assignment]
    asks = Asks(world)
    assert await world.read(priority=ON_DEMAND) == world.blob.data
    assert asks.calls[:near + far] == [*((i, ON_DEMAND) for i in range(near)),
                                       *((i, DEFAULT) for i in range(10, 10 + far))]


async def test_by_default_a_whole_read_asks_in_order(world: World) -> None:
    assert reader.FAR_SHARE == 0, "off by default (the lab on two cores and bench.sim idc3)"
    world.engine.reader.rng = StartAt(10)  # type: ignore[assignment]
    asks = Asks(world)
    assert await world.read() == world.blob.data
    assert asks.pieces() == list(range(COUNT))


async def test_a_ranged_read_asks_nothing_beyond_its_range(world: World) -> None:
    asks = Asks(world)
    rng = ByteRange(5 * PIECE + 10, 9 * PIECE - 1)
    assert await world.read(rng=rng, expect=None) == world.blob.data[rng.start:rng.end + 1]
    assert set(asks.pieces()) == set(range(5, 9))
    assert len(world.parents.fetches) == 4


async def test_a_read_that_stops_asks_for_no_more_far_pieces(
        world: World, window8: tuple[int, int]) -> None:
    near, far = window8
    gate = asyncio.Event()  # the far pieces' parent answers once the client has gone
    fetch = world.parents.fetch
    firsts = {world.blob.chunk(i) for i in range(near)}

    async def gated(addr: str, chunk: str, size: int, priority: int = DEFAULT) -> bytes:
        if chunk not in firsts:
            await gate.wait()
        return await fetch(addr, chunk, size, priority)

    world.parents.fetch = gated  # type: ignore[method-assign]
    asks = Asks(world)
    run = await world.open()
    views = aiter(world.engine.read(run, ByteRange(0, len(world.blob.data) - 1),
                                    world.blob.digest))
    await anext(views)
    assert len([i for i in run.inflight if i >= near]) == far, "far pieces on their way"
    await views.aclose()  # type: ignore[attr-defined]
    asked = len(asks.calls)
    gate.set()

    async def settled() -> bool:
        return not run.inflight
    await until(settled, 10, "the pieces on their way arrived")
    assert len(asks.calls) == asked, "their arrivals asked for no more"
    assert len(run.have) == near + far
