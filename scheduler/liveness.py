"""Peer liveness over UDP: heartbeat datagrams (common/datagram.py) in, `ok` or `unknown` out.

Anything that does not decode (random bytes, oversized, a bad or missing signature, a stale
timestamp) or repeats a nonce already accepted (a replay) is dropped without an answer; a
well-formed heartbeat from a peer the store does not know is answered `unknown`, which makes the
peer register again. The nonces are this process's: see `auth.Verifier`.
"""

from __future__ import annotations

import logging
import time

import asyncio_dgram
from prometheus_client import Counter

from common import auth, datagram
from common.limits import Throttle
from common.models import Heartbeat
from common.tasks import describe
from common.web import REPORT_EVERY, join_hostport, split_listen
from scheduler.state import UnknownPeer
from scheduler.store import Store

log = logging.getLogger("naiad.scheduler.udp")


class HeartbeatListener:
    def __init__(self, store: Store, listen: str, secret: bytes | None,
                 heartbeats: Counter) -> None:
        self.host, self.port = split_listen(listen)
        self.store = store
        self.secret = secret
        # Unsigned datagrams (no secret) can be forged at will: replays are no extra harm.
        self.nonces = auth.NonceCache() if secret is not None else None
        self._counts = {result: heartbeats.labels("udp", result)
                        for result in ("accepted", "unknown", "dropped")}
        self._stream: asyncio_dgram.DatagramServer | None = None
        self._unrecorded = Throttle(REPORT_EVERY)  # the store down: a line a period, not a beat

    async def start(self) -> None:
        self._stream = await asyncio_dgram.bind((self.host, self.port))
        self.port = self._stream.sockname[1]

    @property
    def address(self) -> str:
        return join_hostport(self.host, self.port)

    async def run(self) -> None:
        assert self._stream is not None
        while True:
            try:
                data, addr = await self._stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            try:
                peer_id, hb = self._accept(data)
            except (datagram.DatagramError, auth.AuthError) as e:
                self._counts["dropped"].inc()
                log.debug("dropped a datagram from %s: %s", addr, e)
                continue
            try:
                await self.store.heartbeat(peer_id, hb)
            except UnknownPeer:
                self._counts["unknown"].inc()
                await self._answer(datagram.ACK_UNKNOWN, addr)
                continue
            except Exception as e:  # the state store is down: no answer, the peer uses HTTP
                dropped = self._unrecorded.ready()
                if dropped is not None:
                    log.warning("heartbeat from %s not recorded (%s; %d more not logged)",
                                peer_id, describe(e), dropped)
                continue
            self._counts["accepted"].inc()
            await self._answer(datagram.ACK_OK, addr)

    def _accept(self, data: bytes) -> tuple[str, Heartbeat]:
        now = time.time()
        beat = datagram.decode(data, self.secret, now)
        if self.nonces is not None:
            self.nonces.admit(beat.nonce, beat.ts, now)
        return beat.peer_id, beat.heartbeat

    async def _answer(self, ack: bytes, addr: tuple[str, int]) -> None:
        assert self._stream is not None
        try:
            await self._stream.send(ack, addr)
        except OSError as e:  # the peer's socket is gone: nothing to tell it
            log.debug("cannot answer %s: %s", addr, e)

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.close()
