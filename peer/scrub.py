"""The scrubber: re-hashes every stored chunk, over and over, at a bounded rate and only while
the peer is otherwise idle, so data that rots on disk after it was verified is found and dropped
before anyone asks for it (serving re-hashes too, with --verify-on-serve; this catches what
nobody reads) without taking CPU from transfers."""

from __future__ import annotations

import asyncio
import logging

from common.limits import TokenBucket
from peer.engine import Engine
from peer.store import ChunkCorrupt, ChunkStore

log = logging.getLogger("naiad.peer.scrub")
BATCH = 256
IDLE_SECONDS = 5.0  # between passes over an empty store


class Scrubber:
    def __init__(self, store: ChunkStore, engine: Engine, rate: float,
                 idle: list[asyncio.Event]) -> None:
        self.store = store
        self.engine = engine
        self.idle = idle
        self.bucket = TokenBucket(rate)
        self.checked = 0
        self.passes = 0

    async def run(self) -> None:
        cursor = ""
        while True:
            batch = self.store.chunks_after(cursor, BATCH)
            if not batch:
                if not cursor:
                    await asyncio.sleep(IDLE_SECONDS)
                self.passes += bool(cursor)
                cursor = ""
                continue
            for chunk, size in batch:
                for event in self.idle:
                    await event.wait()
                await self.bucket.take(size)
                try:
                    await self.store.read_chunk(chunk, verify=True)
                except (ChunkCorrupt, FileNotFoundError):
                    log.error("scrub: chunk %s failed its digest", chunk)
                    self.engine.drop_chunk(chunk)
                self.checked += 1
            cursor = batch[-1][0]
