"""Fetching a chunk from a parent peer's upload server: over HTTP (transport 1), or over the
framed transport (2, peer/p2p/) to parents that registered it, given as `framed`.

Errors are classified for the scheduler: `busy` (the parent is at its upload slots: try the next
one, no blame), `slow` (no byte for the stall timeout, `Patience`: abandoned), `failed` (refused,
reset, missing or truncated). Verifying the bytes is the engine's job, in one place.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from typing import TYPE_CHECKING

import aiohttp

from common import auth
from common.limits import DEFAULT, Paced, TokenBucket
from common.log import outgoing
from common.models import ParentRef
from peer import wire

if TYPE_CHECKING:  # the engine imports this module
    from peer.engine.seams import ChunkSource

STALL_SECONDS = 2.0  # the longest a parent may stay silent, or take to connect
STALL_FLOOR = 0.25  # the shortest (a LAN connect takes < 1 ms, a live parent is never this quiet)
STALL_BYTES = 32 << 20  # silent for as long as this peer takes to receive this much: stalled
RATE_SECONDS = 1.0  # the time constant of the receive rate `Patience` keeps
# The address of a parent spoken to over the framed transport, as the engine hands it to a
# ChunkSource: FRAMED + its upload address (`address`).
FRAMED = "p2p+"


class Patience:
    """How long a parent may stay silent (no byte while a request to it is pending), or take
    to connect, before it is `slow`: as long as this peer takes to receive STALL_BYTES from
    its parents at the rate it has lately (a count of the bytes received, decaying with
    RATE_SECONDS), between `floor` and `cap`. A peer that is idle or slow (the lab: 4-10
    MB/s) waits `cap` = STALL_SECONDS as before; a fast one (kraken's 300 MB/s) gives up on a
    dead parent after `floor`, where waiting 2 s with its read blocked on the piece idled its
    link for many pieces' time (bench.sim die1). Pure: `now` is given (monotonic seconds).
    The engine's clients (this module's and peer/p2p/client.py's) share one, and bench/sim
    keeps one per host, fed the same way: each piece a parent sent, when it has arrived."""

    __slots__ = ("_bytes", "_t", "cap", "floor", "nbytes", "tau")

    def __init__(self, cap: float = STALL_SECONDS, floor: float = STALL_FLOOR,
                 nbytes: int = STALL_BYTES, tau: float = RATE_SECONDS) -> None:
        self.cap = cap
        self.floor = min(floor, cap)
        self.nbytes = nbytes
        self.tau = tau
        self._bytes = 0.0  # received, each byte weighted e^-(age / tau)
        self._t = 0.0

    def received(self, nbytes: int, now: float) -> None:
        self._bytes = self._decayed(now) + nbytes
        self._t = now

    def rate(self, now: float) -> float:
        """Bytes per second lately (the decayed count over `tau`: a burst counts as spread
        over `tau`, so a pull's first pieces do not make the peer look fast)."""
        return self._decayed(now) / self.tau

    def seconds(self, now: float) -> float:
        rate = self.rate(now)
        if rate * self.cap <= self.nbytes:
            return self.cap
        return max(self.floor, self.nbytes / rate)

    def _decayed(self, now: float) -> float:
        if not self._bytes or now <= self._t:
            return self._bytes
        return self._bytes * math.exp((self._t - now) / self.tau)


class ParentError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class ParentClient:
    def __init__(self, session: aiohttp.ClientSession, secret: bytes | None = None,
                 stall_seconds: float = STALL_SECONDS, compress: bool = True,
                 rate: TokenBucket | None = None,
                 tls: ssl.SSLContext | None = None,
                 framed: ChunkSource | None = None,
                 patience: Patience | None = None) -> None:
        self.session = session
        self.framed = framed  # None: every parent over HTTP
        # How `https://` parents are verified (--tls-ca, else the system store) and the client
        # certificate this peer presents to them (--tls-cert).
        self.tls: ssl.SSLContext | bool = tls if tls is not None else True
        self.rate = rate  # --download-rate: bytes from other peers
        self.compress = compress
        self.secret = secret
        # Shared with the framed client's (peer/daemon.py): one rate, whichever the transport.
        self.patience = patience if patience is not None else Patience(stall_seconds)

    async def fetch(self, addr: str, chunk: str, size: int, priority: int = DEFAULT) -> bytes:
        if addr.startswith(FRAMED):
            addr = addr.removeprefix(FRAMED)
            if self.framed is not None:
                return await self.framed.fetch(addr, chunk, size, priority)
        # Over HTTP `priority` goes nowhere: each request is its own connection, answered at
        # once or refused busy (peer/upload.py), so there is no queue for it to order.
        path = f"/chunks/{chunk}"
        headers = outgoing()
        if self.compress:
            headers["Accept-Encoding"] = wire.ENCODING
        if self.secret is not None:
            headers[auth.HEADER] = auth.sign(self.secret, "GET", path)
        loop = asyncio.get_running_loop()
        stall = self.patience.seconds(loop.time())
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=stall, sock_read=stall)
        try:
            async with self.session.get(f"{upload_url(addr)}{path}", headers=headers,
                                        timeout=timeout, ssl=self.tls) as resp:
                if resp.status == 503:
                    raise ParentError("busy", f"{addr} has no free upload slot")
                if resp.status != 200:
                    raise ParentError("failed", f"{addr} answered {resp.status}")
                packed = resp.headers.get("Content-Encoding") == wire.ENCODING
                if resp.content_length is not None and not packed \
                        and resp.content_length != size:
                    raise ParentError("failed", f"{addr} offers {resp.content_length} bytes, "
                                                f"piece has {size}")
                # Never more than the piece (or a compressed piece) is read into memory.
                data = await _read_at_most(Paced(resp.content, self.rate),
                                           size + (64 << 10 if packed else 0))
                if packed:
                    data = await unpack(data, size, addr)
        except TimeoutError as e:
            raise ParentError("slow", f"{addr} stalled") from e
        except (aiohttp.ClientError, OSError) as e:
            raise ParentError("failed", f"{addr}: {e!r}") from e
        if len(data) != size:
            raise ParentError("failed", f"{addr} sent {len(data)} of {size} bytes")
        self.patience.received(size, loop.time())
        return data


def address(parent: ParentRef) -> str:
    """Where the engine fetches from a parent: over the framed transport if it speaks it."""
    return FRAMED + parent.addr if parent.transport >= 2 else parent.addr


def upload_url(addr: str) -> str:
    """The base URL of a registered upload address: `https://host:port` as given (a TLS upload
    port), `host:port` over plain HTTP (peers before TLS, or without certificates)."""
    return addr if addr.startswith("https://") else f"http://{addr}"


async def _read_at_most(stream: Paced, limit: int) -> bytes:
    parts, got = [], 0
    while part := await stream.read(limit + 1 - got):
        parts.append(part)
        got += len(part)
        if got > limit:
            raise ParentError("failed", f"sent more than {limit} bytes")
    return b"".join(parts)


async def unpack(data: bytes, size: int, addr: str) -> bytes:
    """A zstd piece decompressed to exactly `size` bytes, or ParentError `corrupt`."""
    try:
        if size >= 1 << 20:  # the GIL is released while zstd works
            return await asyncio.to_thread(wire.unpack, data, size)
        return wire.unpack(data, size)
    except wire.WireError as e:
        raise ParentError("corrupt", f"{addr}: {e}") from e
