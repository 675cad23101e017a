"""Receive buffers reused only once nothing refers to them (peer/p2p/buffers.py)."""

from __future__ import annotations

import asyncio
import os

from peer.p2p.buffers import POOLED_MIN, Buffers

MiB = 1 << 20


def test_a_buffer_is_reused_only_once_nothing_holds_it() -> None:
    pool = Buffers(limit=8 * MiB)
    a = pool.take(MiB)
    assert pool.take(MiB) is not a  # `a` is held here
    a_id = id(a)
    view = memoryview(a)[10:20]  # a slice handed on (a reader's yield)
    del a
    assert id(pool.take(MiB)) != a_id  # the export still refers to it
    del view
    assert id(pool.take(MiB)) == a_id
    assert pool.pooled == 2 * MiB  # `a`, and the one taken (and dropped) while it was held


def test_sizes_are_exact_and_small_ones_are_not_pooled() -> None:
    pool = Buffers(limit=8 * MiB)
    big = pool.take(2 * MiB)
    del big
    assert len(pool.take(MiB)) == MiB and pool.pooled == 3 * MiB
    small = pool.take(POOLED_MIN - 1)
    assert len(small) == POOLED_MIN - 1 and pool.pooled == 3 * MiB


def test_the_limit_lets_free_buffers_go_and_never_counts_more() -> None:
    pool = Buffers(limit=4 * MiB)
    held = [pool.take(MiB) for _ in range(4)]
    extra = pool.take(MiB)  # beyond the limit, all in use: a fresh unpooled buffer
    pooled_ids = {id(b) for b in held}  # (not in an assert: pytest keeps its temporaries)
    assert pool.pooled == 4 * MiB and id(extra) not in pooled_ids
    held.pop()
    held.pop()
    two = pool.take(2 * MiB)  # room made by letting two free ones go
    assert len(two) == 2 * MiB and pool.pooled == 4 * MiB and pool.free_bytes() == 0
    del held, two, extra
    assert pool.free_bytes() == 4 * MiB
    assert pool.release() == 4 * MiB and pool.pooled == 0


async def test_a_buffer_in_a_worker_thread_is_not_reused_meanwhile() -> None:
    pool = Buffers(limit=8 * MiB)
    a = pool.take(MiB)
    a[:] = os.urandom(MiB)
    expected = bytes(a)
    started, go = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def work(data: bytearray) -> bytes:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(go.wait(), loop).result()
        return bytes(data)

    job = asyncio.create_task(asyncio.to_thread(work, a))
    del a
    await started.wait()
    other = pool.take(MiB)  # must not be the one the thread still reads
    other[:] = bytes(MiB)
    go.set()
    assert await job == expected
