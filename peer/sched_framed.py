"""The peer's framed calls to its schedulers: one persistent connection per scheduler carrying
many calls at once (common/callframes.py, scheduler/framed.py), HTTP for the rest.

`FramedTransport` is a `Transport` (peer/sched_transport.py) in front of the HTTP one. The
routes peers call often go framed when the scheduler offers it; a scheduler from before (its
HTTP parser answers 400 to the preface, or it closes) is remembered and called over HTTP, and
asked again at the next registration (an upgrade looks like a lost session from here). A
connection that drops fails the calls in flight on it as a broken HTTP connection fails a call
(`SchedulerUnavailable`, unusable: the session fails over); the next call connects again. An
`https` scheduler gets a TLS connection, verified as the HTTP client verifies it. A schedule
call made with a `PARTS` sink, to a scheduler that offers parts, is answered in parts: each
handed to the sink as it comes, the call's reply the final one (common/callframes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel

from common import auth
from common import callframes as cf
from common.log import request_id
from common.tasks import describe
from peer.sched_transport import (
    CONNECT_SECONDS,
    PARTS,
    SchedulerUnavailable,
    Transport,
    parse_reply,
)

log = logging.getLogger("naiad.peer.scheduler")
R = TypeVar("R", bound=BaseModel)


class _Plain(Exception):
    """The scheduler does not take framed calls."""


class _Link:
    """One open connection: calls by id, a reader task that hands replies to their callers."""

    def __init__(self, url: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 window: int, max_body: int, parts: bool = False) -> None:
        self.url = url
        self.reader = reader
        self.writer = writer
        self.max_body = max_body
        self.parts = parts  # the scheduler answers schedule calls in parts
        self.slots = asyncio.Semaphore(window)
        self.pending: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.on_part: dict[int, Callable[[int, bytes], None]] = {}  # calls asked in parts
        self.ids = itertools.count(1)
        self.dead: str | None = None  # why, once the connection is gone
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        why = "closed by the scheduler"
        try:
            frames = cf.Reader(self.max_body, cf.TO_PEER)
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    break
                for f in frames.feed(data):
                    if f.kind == cf.ERROR:
                        why = f"refused: {f.body.decode(errors='replace')[:300]}"
                        return
                    if f.kind != cf.REPLY:  # a second WELCOME
                        raise cf.FrameError(f"a frame of kind {f.kind} after the WELCOME")
                    if f.flags & cf.PARTS:
                        self._part(f)
                        continue
                    fut = self.pending.pop(f.call, None)
                    if fut is not None and not fut.done():  # else: its caller gave up
                        fut.set_result((f.status, f.body))
        except (OSError, cf.FrameError) as e:
            why = describe(e)
        except asyncio.CancelledError:
            why = "closed"
            raise
        finally:
            self._fail(why)

    def _part(self, f: cf.Frame) -> None:
        """A part of a call's answer, to its caller's sink; a part it cannot take (not a
        reply, or the sink fails) ends that call with the failure, not the connection."""
        fut, sink = self.pending.get(f.call), self.on_part.get(f.call)
        if fut is None or fut.done():
            return  # its caller gave up
        if sink is None:
            fut.set_exception(SchedulerUnavailable(f"{self.url}: a part of an answer to a "
                                                   f"call that asked for one"))
            return
        try:
            sink(f.status, f.body)
        except Exception as e:  # the caller's failure: raised where it waits
            fut.set_exception(e)

    def _fail(self, why: str) -> None:
        if self.dead is None:
            self.dead = why
            if self.pending:
                log.info("framed connection to %s lost with %d calls in flight: %s",
                         self.url, len(self.pending), why)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(SchedulerUnavailable(f"{self.url}: connection lost: {why}"))
        self.pending.clear()
        self.writer.close()

    async def call(self, path: str, signature: str | None, body: bytes, seconds: float,
                   on_part: Callable[[int, bytes], None] | None = None) -> tuple[int, bytes]:
        """The (status, body) of the call's reply; `on_part`: the call is asked in parts
        (the scheduler offers them), each part's (status, body) handed to it as it comes."""
        async with asyncio.timeout(seconds):
            async with self.slots:
                if self.dead is not None:
                    raise SchedulerUnavailable(f"{self.url}: connection lost: {self.dead}")
                call_id = next(self.ids) & 0xFFFFFFFF
                fut: asyncio.Future[tuple[int, bytes]] = \
                    asyncio.get_running_loop().create_future()
                self.pending[call_id] = fut
                if on_part is not None and self.parts:
                    self.on_part[call_id] = on_part
                try:
                    self.writer.write(cf.call(call_id, path, signature, request_id.get(),
                                              body, call_id in self.on_part))
                    await self.writer.drain()
                    return await fut
                finally:
                    self.pending.pop(call_id, None)
                    self.on_part.pop(call_id, None)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self._fail("closed")
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class FramedTransport:
    """Framed calls where the scheduler offers them, `http` for everything else."""

    def __init__(self, http: Transport, secret: bytes | None,
                 tls: ssl.SSLContext | None = None, parts: bool = True) -> None:
        self.http = http
        self.secret = secret
        self.tls = tls
        self.parts = parts  # ask for answers in parts where offered (off: a peer from before)
        self.framed = 0  # calls answered over framed connections
        self._links: dict[str, _Link] = {}
        self._plain: set[str] = set()  # schedulers that take no framed calls
        self._connecting: dict[str, asyncio.Lock] = {}

    async def post(self, url: str, path: str, body: BaseModel | None, reply: type[R] | None,
                   seconds: float = 5.0) -> R | None:
        hit = cf.route(path)
        if hit is not None and hit[0] == "peers":
            self._plain.discard(url)  # a registration asks again: it may have been upgraded
        if hit is None or url in self._plain:
            return await self.http.post(url, path, body, reply, seconds)
        try:
            link = await self._link(url, seconds)
        except _Plain:
            return await self.http.post(url, path, body, reply, seconds)
        data = (body.model_dump_json() if body is not None else "{}").encode()
        if len(data) > link.max_body:  # HTTP answers it 413, as it always has
            return await self.http.post(url, path, body, reply, seconds)
        signature = auth.sign(self.secret, "POST", path, data) \
            if self.secret is not None else None
        sink = PARTS.get() if hit[0] == "schedule" else None
        on_part = None if sink is None else \
            (lambda status, raw: sink(parse_reply(status, raw, reply, url)))
        try:
            status, raw = await link.call(path, signature, data, seconds, on_part)
        except TimeoutError as e:
            raise SchedulerUnavailable(f"{url}: timed out") from e
        except OSError as e:  # the connection broke as the call was written
            raise SchedulerUnavailable(f"{url}: {describe(e)}") from e
        self.framed += 1
        return parse_reply(status, raw, reply, url)

    async def _link(self, url: str, seconds: float) -> _Link:
        link = self._links.get(url)
        if link is not None and link.dead is None:
            return link
        lock = self._connecting.setdefault(url, asyncio.Lock())
        async with lock:
            link = self._links.get(url)
            if link is not None and link.dead is None:
                return link
            if url in self._plain:
                raise _Plain
            try:
                link = await self._open(url, min(CONNECT_SECONDS, seconds))
            except _Plain as e:
                self._plain.add(url)
                log.info("scheduler %s takes no framed calls (%s): calling it over HTTP",
                         url, e)
                raise
            except (OSError, TimeoutError, ssl.SSLError) as e:
                raise SchedulerUnavailable(f"{url}: {describe(e)}") from e
            self._links[url] = link
            return link

    async def _open(self, url: str, seconds: float) -> _Link:
        """A connection that took the preface; _Plain if what answered is no framed edge (an
        HTTP answer, a close, or silence for `seconds`), OSError if nothing answered."""
        parts = urlsplit(url)
        tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            tls = self.tls or ssl.create_default_context()
        port = parts.port or (443 if tls else 80)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port, ssl=tls), seconds)
        try:
            writer.write(cf.PREFACE)
            async with asyncio.timeout(seconds):
                head = await reader.readexactly(cf.HEADER.size)
                kind, flags, _, _, length = cf.HEADER.unpack(head)
                if kind != cf.WELCOME or length > 64:  # an HTTP answer: "HTTP/1.1 400 ..."
                    raise _Plain(f"it answered {head[:12]!r}")
                window, max_body = cf.parse_welcome(await reader.readexactly(length))
        except (asyncio.IncompleteReadError, cf.FrameError, TimeoutError, OSError) as e:
            writer.close()
            raise _Plain(describe(e)) from None
        except BaseException:
            writer.close()
            raise
        return _Link(url, reader, writer, window, max_body,
                     self.parts and bool(flags & cf.PARTS))

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()
