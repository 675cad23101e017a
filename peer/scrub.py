"""The scrubber: re-hashes every stored chunk, over and over, at a bounded rate and only once
the peer has had no transfer for a while (QUIET_SECONDS), so data that rots on disk after it
was verified is found and dropped before anyone asks for it (serving re-hashes too, with
--verify-on-serve; this catches what nobody reads) without taking CPU from transfers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common.limits import TokenBucket
from common.tasks import Activity
from peer.engine import Engine
from peer.store import ChunkCorrupt, ChunkStore

log = logging.getLogger("naiad.peer.scrub")
BATCH = 256
IDLE_SECONDS = 5.0  # between passes over an empty store
# How long the peer must have had no transfer before a chunk is re-hashed: the gaps between the
# pieces of a pull are not idleness (scrubbing in them took ~20 % of the peers' CPU in the lab).
QUIET_SECONDS = 2.0


class Scrubber:
    def __init__(self, store: ChunkStore, engine: Engine, rate: float,
                 parts: list[Activity],
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.engine = engine
        self.parts = parts
        self.bucket = TokenBucket(rate)
        # The quiet and idle waits: on the clock of the parts' Activity (a test's own clock).
        self._sleep = sleep
        self.checked = 0
        self.passes = 0

    async def run(self) -> None:
        cursor = ""
        while True:
            batch = self.store.chunks_after(cursor, BATCH)
            if not batch:
                if not cursor:
                    await self._sleep(IDLE_SECONDS)
                self.passes += bool(cursor)
                cursor = ""
                continue
            for chunk, size in batch:
                await self._quiet()
                await self.bucket.take(size)
                await self._quiet()  # the tokens may have taken a while
                try:
                    await self.store.read_chunk(chunk, verify=True)
                except (ChunkCorrupt, OSError) as e:
                    if not self.store.indexed(chunk):
                        continue  # evicted or dropped since listed: nothing to check
                    log.error("scrub: chunk %s failed its digest: %r", chunk, e)
                    self.engine.drop_chunk(chunk)
                self.checked += 1
            cursor = batch[-1][0]

    async def _quiet(self) -> None:
        """Return once every part of the peer has been idle for QUIET_SECONDS."""
        while True:
            for part in self.parts:
                await part.idle.wait()
            quiet = min(part.quiet_for() for part in self.parts)
            if quiet >= QUIET_SECONDS:
                return
            await self._sleep(QUIET_SECONDS - quiet)
