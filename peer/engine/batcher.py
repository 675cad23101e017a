"""A task's piece workers' decision requests, coalesced into schedule calls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from common.limits import ON_DEMAND
from common.models import Decision
from common.tasks import TaskSet, consume_exception
from peer.engine.acquire import LONG_POLL_MS, ON_DEMAND_WAIT, bypass
from peer.engine.seams import Clock, Decider
from peer.sched_transport import SchedulerRefused, SchedulerUnavailable


class DecisionBatcher:
    """Coalesces the decision requests of a task's piece workers into schedule calls.

    Pieces asked for in the same loop iteration travel in one call; a piece told to wait goes
    back into the next call, which long-polls while every piece in it must wait. A scheduler
    that answers in parts (framed calls) keeps a call parked for its pieces still to decide and
    sends each piece as decided: those answered, the call's others stay asked, not asked again
    (that was a call, and a re-decision of each piece left, per piece handed out). An on-demand
    piece (priority 6) that has waited ON_DEMAND_WAIT for a lease holder is answered with a
    direct origin fetch of its own (`bypass`), so a container's read is never stuck behind a
    slow holder.
    """

    def __init__(self, client: Decider, task_id: str, tasks: TaskSet,
                 priority_of: Callable[[int], int], registry: Callable[[], str],
                 clock: Clock) -> None:
        self.client = client
        self.task_id = task_id
        self.tasks = tasks
        self.priority_of = priority_of
        self.registry = registry
        self.clock = clock
        self._unsent: dict[int, _Ask] = {}
        self._flush_scheduled = False

    def decide(self, index: int, exclude: frozenset[str]) -> asyncio.Future[Decision]:
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(consume_exception)
        self._unsent[index] = _Ask(fut, exclude, self.clock.monotonic())
        self._schedule_flush()
        return fut

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch = {i: ask for i, ask in self._unsent.items() if not ask.fut.done()}
        self._unsent = {}
        if batch:
            self.tasks.spawn(self._call(batch), f"schedule-{self.task_id[:19]}")

    async def _call(self, batch: dict[int, _Ask]) -> None:
        exclude: set[str] = set()
        for ask in batch.values():
            exclude |= ask.exclude
        urgent = any(self.priority_of(i) >= ON_DEMAND for i in batch)

        def answered(decisions: list[Decision]) -> None:
            now = self.clock.monotonic()
            for d in decisions:
                ask = batch.pop(d.piece, None)
                if ask is None or ask.fut.done():
                    continue
                answer = bypass(d, self.priority_of(d.piece) >= ON_DEMAND, now - ask.since)
                if answer is not None:
                    ask.fut.set_result(answer)
                else:
                    self._unsent[d.piece] = ask
                    self._schedule_flush()
        try:
            decisions = await self.client.schedule(
                self.task_id, list(batch), exclude,
                int(ON_DEMAND_WAIT * 1000) if urgent else LONG_POLL_MS, self.registry(),
                part=answered)
        except (SchedulerUnavailable, SchedulerRefused) as e:
            for ask in batch.values():  # what parts answered is out of the batch
                if not ask.fut.done():
                    ask.fut.set_exception(e)
            return
        answered(decisions)
        for ask in batch.values():
            if not ask.fut.done():
                ask.fut.set_exception(SchedulerUnavailable("scheduler gave no decision"))


@dataclass
class _Ask:
    fut: asyncio.Future[Decision]
    exclude: frozenset[str]
    since: float
