"""PrioritySlots: the most urgent waiter goes first, then arrival order; cancellation never
leaks a slot."""

from __future__ import annotations

import asyncio

import pytest

from common.limits import DEFAULT, PrioritySlots, parse_priority


@pytest.mark.parametrize(("header", "expected"), [
    ("6", 6), ("3", 3), (" 0 ", 0), ("7", DEFAULT), ("-1", DEFAULT), ("x", DEFAULT),
    (None, DEFAULT), ("", DEFAULT), ("٦", DEFAULT)])
def test_parse_priority(header: str | None, expected: int) -> None:
    assert parse_priority(header) == expected


async def test_waiters_are_admitted_by_priority_then_arrival() -> None:
    slots = PrioritySlots(1)
    await slots.acquire(0)
    order: list[str] = []

    async def waiter(name: str, priority: int) -> None:
        await slots.acquire(priority)
        order.append(name)
        slots.release()

    tasks = [asyncio.create_task(waiter(n, p))
             for n, p in (("pre1", 3), ("bg", 1), ("od1", 6), ("pre2", 3), ("od2", 6))]
    while len(slots._waiters) < 5:  # noqa: ASYNC110 - yield until all five queue up
        await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["od1", "od2", "pre1", "pre2", "bg"]
    assert slots.busy == 0


async def test_cancelled_waiter_leaks_no_slot() -> None:
    slots = PrioritySlots(1)
    await slots.acquire(0)
    blocked = asyncio.create_task(slots.acquire(6))
    await asyncio.sleep(0)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    slots.release()
    assert slots.busy == 0
    async with slots.hold(1):
        assert slots.busy == 1
    assert slots.busy == 0


async def test_slots_bound_concurrency() -> None:
    slots = PrioritySlots(3)
    inside = peak = 0
    gate = asyncio.Event()

    async def work(p: int) -> None:
        nonlocal inside, peak
        async with slots.hold(p):
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1

    tasks = [asyncio.create_task(work(i % 7)) for i in range(10)]
    while slots.busy < 3:  # noqa: ASYNC110 - yield until three are inside
        await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    assert peak == 3 and slots.busy == 0


async def test_waited_is_how_long_urgent_work_has_queued() -> None:
    now = [100.0]
    slots = PrioritySlots(1, clock=lambda: now[0])
    assert slots.waited(6) == 0.0
    await slots.acquire(1)
    background = asyncio.create_task(slots.acquire(1))
    await asyncio.sleep(0)
    now[0] += 2.0
    urgent = asyncio.create_task(slots.acquire(6))
    await asyncio.sleep(0)
    now[0] += 0.5
    assert slots.waited(6) == 0.5  # the on-demand waiter, not the older background one
    assert slots.waited(1) == 2.5
    slots.release()  # the urgent waiter goes in: nothing urgent queues any more
    await urgent
    assert slots.waited(6) == 0.0 and slots.waited(1) == 2.5
    background.cancel()
    with pytest.raises(asyncio.CancelledError):
        await background
    assert slots.waited(0) == 0.0


async def test_try_acquire_admits_only_when_a_slot_is_free_and_nobody_waits() -> None:
    slots = PrioritySlots(1)
    assert slots.try_acquire(1)
    assert not slots.try_acquire(6)  # full, however urgent
    waiter = asyncio.create_task(slots.acquire(1))
    await asyncio.sleep(0)
    slots.release()  # the freed slot is the queued waiter's, not a newcomer's
    assert not slots.try_acquire(6)
    await waiter
    assert slots.busy == 1
    slots.release()
    assert slots.try_acquire(6)
    assert slots.busy == 1
