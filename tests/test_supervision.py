"""Supervised background loops (common/tasks.py): a loop that raises is restarted with backoff,
logged in one line and counted in `naiad_background_restarts_total{loop}`; closing the owner
still cancels it. Directly, then on a live scheduler whose Redis goes away."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from common.metrics import restarts_counter
from common.tasks import Backoff, TaskSet
from tests.cluster import Cluster, Registry, metric, spawn, until
from tests.test_store_behaviour import RedisServer

QUICK = Backoff(first=0.001, most=0.004, healthy=10.0)


def _count(registry: CollectorRegistry, loop: str) -> float | None:
    return registry.get_sample_value("naiad_background_restarts_total", {"loop": loop})


def test_backoff_doubles_up_to_its_ceiling_and_resets_after_a_healthy_run() -> None:
    b = Backoff(first=0.1, most=1.0, healthy=30.0)
    assert [b.delay(0.0) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.delay(29.9) == 1.0  # not healthy long enough
    assert b.delay(30.0) == 0.1  # a healthy run starts over
    assert b.delay(0.0) == 0.2


async def test_a_loop_that_fails_twice_then_runs_is_restarted_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    tasks = TaskSet("test", restarts_counter(registry))
    runs = 0
    running = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"broken\nrun {runs}")
        running.set()
        await asyncio.Event().wait()  # then runs for good

    with caplog.at_level(logging.WARNING, "naiad.tasks"):
        tasks.supervise("flaky", loop, QUICK)
        assert _count(registry, "flaky") == 0  # the series is there before any failure
        await asyncio.wait_for(running.wait(), 5)
    assert runs == 3
    assert _count(registry, "flaky") == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "naiad.tasks"]
    assert lines == ["test: loop flaky failed (RuntimeError: broken run 1); restarting in 0.0 s",
                     "test: loop flaky failed (RuntimeError: broken run 2); restarting in 0.0 s"]
    assert all(r.exc_info is None for r in caplog.records if r.name == "naiad.tasks")
    await tasks.close()
    assert len(tasks) == 0


async def test_the_wait_between_restarts_grows() -> None:
    now = 0.0
    waits: list[float] = []
    tasks = TaskSet("test", clock=lambda: now)
    backoff = Backoff(first=0.01, most=0.04, healthy=1.0)
    done = asyncio.Event()
    real_delay = backoff.delay

    def delay(ran_for: float) -> float:
        waits.append(real_delay(ran_for))
        return waits[-1]
    backoff.delay = delay  # type: ignore[method-assign]

    async def loop() -> None:
        nonlocal now
        if len(waits) == 4:
            now += 5.0  # this run lasts past `healthy` before it fails
        if len(waits) == 6:
            done.set()
            return
        raise OSError("down")

    tasks.supervise("down", loop, backoff)
    await asyncio.wait_for(done.wait(), 5)
    assert waits == [0.01, 0.02, 0.04, 0.04, 0.01, 0.02]
    await tasks.close()


async def test_closing_cancels_a_supervised_loop_even_while_it_backs_off() -> None:
    tasks = TaskSet("test")
    started = asyncio.Event()
    cancelled: list[str] = []

    async def sleeper() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append("sleeper")
            raise

    async def failing() -> None:
        raise ValueError("always")

    tasks.supervise("sleeper", sleeper)
    tasks.supervise("failing", failing, Backoff(first=30.0))  # parked in a 30 s backoff
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.close(), 2)
    assert cancelled == ["sleeper"] and len(tasks) == 0
    with pytest.raises(RuntimeError):
        tasks.supervise("late", sleeper)


async def test_a_loop_that_returns_is_done_not_restarted() -> None:
    registry = CollectorRegistry()
    tasks = TaskSet("test", restarts_counter(registry))
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    await asyncio.wait_for(tasks.supervise("once", once, QUICK), 5)
    assert runs == 1 and _count(registry, "once") == 0
    await tasks.close()


async def test_a_scheduler_restarts_its_loops_while_redis_is_gone_and_counts_them(
        cluster: Cluster, registry: Registry, tmp_path: Path) -> None:
    """Redis SIGKILLed under a running scheduler: its expiry loop and change feed fail, are
    restarted with backoff and counted on /metrics; the peer's loops show at 0; once Redis is
    back the scheduler works again."""
    server = RedisServer(tmp_path / "redis")
    server.wait_ready()
    try:
        sched = await cluster.scheduler("--redis", server.url)
        peer = await cluster.peer("a", sched.url, registry.url)
        for loop in ("scheduler-expiry", "redis-changes", "scheduler-udp"):
            assert await metric(sched.url, "naiad_background_restarts_total",
                                {"loop": loop}) == 0
        for loop in ("scheduler-session", "scheduler-heartbeats", "scheduler-announcer",
                     "peer-gauges", "peer-scrubber"):
            assert await metric(peer.url, "naiad_background_restarts_total",
                                {"loop": loop}) == 0
        server.proc.kill()
        server.proc.popen.wait()

        async def failed_twice() -> bool:  # /metrics needs the store: read it once back
            logs = sched.proc.logs()
            return all(logs.count(f"loop {loop} failed") >= 2
                       for loop in ("scheduler-expiry", "redis-changes"))
        await until(failed_twice, 20, "the expiry loop and the change feed failing twice")
        logs = sched.proc.logs()
        assert "Traceback" not in logs
        assert "redis-store: loop redis-changes failed (ConnectionError: " in logs
        assert "scheduler: loop scheduler-expiry failed (ConnectionError: " in logs

        server.proc = spawn("redis", [server.binary, *server.args], tmp_path / "redis")
        server.wait_ready()

        async def back() -> bool:  # the peer registered again with the restarted Redis
            async with aiohttp.ClientSession() as s, s.get(f"{sched.url}/api/v1/peers") as r:
                return r.status == 200 and [p["id"] for p in (await r.json())["peers"]] == ["a"]
        await until(back, 30, "the peer listed again")
        for loop in ("scheduler-expiry", "redis-changes"):
            async def counted(loop: str = loop) -> bool:
                # One failure each in the log and on /metrics: read the log on both sides of
                # the metric, so a failure landing in between (the feed reconnecting) is not
                # a mismatch but a reason to look again.
                before = sched.proc.logs().count(f"loop {loop} failed")
                restarts = await metric(sched.url, "naiad_background_restarts_total",
                                        {"loop": loop})
                after = sched.proc.logs().count(f"loop {loop} failed")
                return before == after and 2 <= restarts == after
            await until(counted, 10, f"{loop}: its restarts counted, one per logged failure")
        # The restarted expiry loop works again: a peer killed now expires.
        peer.proc.kill()

        async def expired() -> bool:
            async with aiohttp.ClientSession() as s, s.get(f"{sched.url}/api/v1/peers") as r:
                return r.status == 200 and (await r.json())["peers"] == []
        await until(expired, 15, "the killed peer expired")
    finally:
        server.stop()
