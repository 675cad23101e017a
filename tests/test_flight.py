"""common/flight.py: concurrent callers for one key share one call, and none is left waiting."""

from __future__ import annotations

import asyncio

import pytest

from common.flight import SingleFlight


class Call:
    """A call that runs until released; counts how often it was started."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.error: BaseException | None = None

    async def __call__(self) -> str:
        self.started += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"value {self.started}"


async def test_callers_of_one_key_share_one_call_and_its_value() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    call = Call()
    callers = [asyncio.create_task(flight.run("k", call)) for _ in range(5)]
    await asyncio.sleep(0)
    assert "k" in flight and len(flight) == 1
    call.release.set()
    assert await asyncio.gather(*callers) == ["value 1"] * 5
    assert call.started == 1
    assert "k" not in flight, "nothing is kept once the call ended"


async def test_other_keys_run_their_own_calls() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    a, b = Call(), Call()
    ta, tb = asyncio.create_task(flight.run("a", a)), asyncio.create_task(flight.run("b", b))
    await asyncio.sleep(0)
    assert len(flight) == 2
    a.release.set()
    b.release.set()
    assert await asyncio.gather(ta, tb) == ["value 1", "value 1"]


async def test_after_the_call_the_next_caller_starts_a_new_one() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    call = Call()
    call.release.set()
    assert await flight.run("k", call) == "value 1"
    assert await flight.run("k", call) == "value 2"


async def test_every_caller_gets_the_calls_exception() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    call = Call()
    call.error = OSError("gone")
    callers = [asyncio.create_task(flight.run("k", call)) for _ in range(3)]
    await asyncio.sleep(0)
    call.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    assert call.started == 1 and "k" not in flight


async def test_a_cancelled_waiter_leaves_the_call_to_the_others() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    call = Call()
    first = asyncio.create_task(flight.run("k", call))
    waiter = asyncio.create_task(flight.run("k", call))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    call.release.set()
    assert await first == "value 1"


async def test_a_cancelled_first_caller_never_leaves_its_waiters_hanging() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    call = Call()
    first = asyncio.create_task(flight.run("k", call))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(flight.run("k", call))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 1)
    assert "k" not in flight
    call.release.set()
    assert await flight.run("k", call) == "value 2", "the key is free again"
