"""The framed scheduler protocol's wire format, pure: no sockets.

A peer opens one connection to its scheduler's HTTP port with PREFACE (the port tells it apart
from HTTP by those bytes; an HTTP server answers 400 to it, which is how a peer tells a
scheduler from before this protocol); the scheduler answers WELCOME with its window (the calls
it takes in flight on one connection) and its largest body. Then the peer sends CALLs, many in
flight, and the scheduler answers each with one REPLY, in any order: a long-polling schedule
call holds nothing up. ERROR ends a connection the other side broke the rules on.

Every frame is a fixed HEADER then `length` bytes of body:

    kind u8 | flags u8 | status u16 | call id u32 | body length u32

PARTS, the one flag (a byte every side before it skipped, so both ends of a mixed pair see
none): on WELCOME, the scheduler answers a schedule call in parts; on a CALL, the peer wants
its schedule call answered so; on a REPLY, a part, more REPLYs for the call follow. A long poll
answered in parts sends each piece as it is decided (`parents`, `source`) and stays parked for
the rest, until the last is decided or `wait_ms` runs out (the final REPLY, with the `wait`s
left): answered at the first decided piece with `wait` for the others, a peer asked again at
once for all of them, one call and a re-decision of each per piece handed out.

A CALL's body is `path length u16 | signature length u8 | request id length u8`, the path, the
signature (`X-Naiad-Auth`'s value, common.auth: the same canonical string and HMAC as the HTTP
call, method POST), the request id (`X-Request-Id`'s), then the JSON body the HTTP call would
POST. A REPLY's status is the HTTP status the route would answer, its body the same JSON.

Why not peer/p2p/frames.py's codec: its kinds, its 4 KiB bound on anything but a piece, and its
REQUEST (a chunk id and a size) are the piece transport's; a call needs a route, a signature
and a JSON body of up to the HTTP body limit, and a status the HTTP answer's.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

VERSION = 1
# The blank line makes it a whole (bad) HTTP request head: any HTTP parser answers it at once.
PREFACE = b"NAIAD-SCHED/1\r\n\r\n"
HEADER = struct.Struct("!BBHII")
WELCOME, CALL, REPLY, ERROR = 1, 2, 3, 4
KINDS = frozenset({WELCOME, CALL, REPLY, ERROR})
TO_SCHEDULER = frozenset({CALL})
TO_PEER = frozenset({WELCOME, REPLY, ERROR})
PARTS = 1  # the flag (above)
MAX_BODY = 4 << 20  # the scheduler's HTTP body limit (client_max_size)
MAX_ERROR = 4 << 10
# What a peer takes in one REPLY: HTTP bounds no answer, but a frame must be; ~100x the
# largest a scheduler sends (a schedule reply of MAX_BATCH decisions).
MAX_REPLY = 64 << 20
_WELCOME = struct.Struct("!HHI")  # version, window, largest body
_CALL = struct.Struct("!HBB")  # path, signature and request id lengths
API = "/api/v1"
# The routes peers call often, by name; /api/v1/peers/{id}/<name> for the per-peer ones. The
# framed edge serves these, a peer sends only these framed (anything else goes over HTTP).
ROUTES = {f"{API}/{name}": name for name in
          ("peers", "tasks", "announce", "schedule", "reports", "withdraw", "mismatches")}
PEER_ROUTES = frozenset({"heartbeat", "leave", "work"})
_PEER_PATH = re.compile(rf"{API}/peers/([^/]+)/([a-z]+)")


class FrameError(ValueError):
    """Bytes that are not this protocol: the connection cannot go on."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    status: int
    call: int
    body: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Call:
    call: int
    path: str
    signature: str | None
    request_id: str | None
    body: bytes
    parts: bool = False  # answer a schedule call in parts (PARTS)


def route(path: str) -> tuple[str, str | None] | None:
    """The (route name, peer id) a path names, None if it is not one sent framed."""
    name = ROUTES.get(path)
    if name is not None:
        return name, None
    m = _PEER_PATH.fullmatch(path)
    if m is None or m.group(2) not in PEER_ROUTES:
        return None
    return m.group(2), m.group(1)


def frame(kind: int, body: bytes, call: int = 0, status: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(kind, flags, status, call, len(body)) + body


def welcome(window: int, max_body: int = MAX_BODY, parts: bool = False) -> bytes:
    return frame(WELCOME, _WELCOME.pack(VERSION, min(window, 0xFFFF), max_body),
                 flags=PARTS if parts else 0)


def parse_welcome(body: bytes) -> tuple[int, int]:
    """The (window, largest body) a WELCOME offers (whether it offers parts is its header's
    flag)."""
    if len(body) != _WELCOME.size:
        raise FrameError("WELCOME of the wrong size")
    version, window, max_body = _WELCOME.unpack(body)
    if version != VERSION:
        raise FrameError(f"scheduler speaks framed calls version {version}")
    return max(1, window), max_body


def call(call_id: int, path: str, signature: str | None, request_id: str | None,
         body: bytes, parts: bool = False) -> bytes:
    p, s, r = path.encode(), (signature or "").encode(), (request_id or "").encode()
    return frame(CALL, _CALL.pack(len(p), len(s), len(r)) + p + s + r + body, call_id,
                 flags=PARTS if parts else 0)


def parse_call(f: Frame) -> Call:
    body = f.body
    if len(body) < _CALL.size:
        raise FrameError("CALL too short")
    lp, ls, lr = _CALL.unpack_from(body)
    start = _CALL.size
    if len(body) < start + lp + ls + lr:
        raise FrameError("CALL shorter than its fields")
    try:
        path, sig, rid = (body[a:b].decode("ascii") for a, b in (
            (start, start + lp), (start + lp, start + lp + ls),
            (start + lp + ls, start + lp + ls + lr)))
    except UnicodeDecodeError:
        raise FrameError("CALL with a non-ASCII path, signature or request id") from None
    return Call(f.call, path, sig or None, rid or None, body[start + lp + ls + lr:],
                bool(f.flags & PARTS))


def reply(call_id: int, status: int, body: bytes, more: bool = False) -> bytes:
    """A call's answer; `more`: a part of it, more REPLYs follow (PARTS)."""
    return frame(REPLY, body, call_id, status, PARTS if more else 0)


def error(reason: str) -> bytes:
    return frame(ERROR, reason.encode()[:MAX_ERROR])


class Reader:
    """Bytes in, whole frames out; FrameError on bytes that are not frames or a body over its
    bound (told from the header, before any of it is buffered): a CALL's is `max_body` and
    its fields, a REPLY's MAX_REPLY."""

    def __init__(self, max_body: int = MAX_BODY,
                 kinds: frozenset[int] = KINDS) -> None:
        self.max_body = max_body
        self.kinds = kinds  # what this side may be sent: anything else is refused at once
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buffer
        buf += data
        out: list[Frame] = []
        at = 0
        while len(buf) - at >= HEADER.size:
            kind, flags, status, call_id, length = HEADER.unpack_from(buf, at)
            if kind not in self.kinds:
                raise FrameError(f"unknown frame kind {kind}" if kind not in KINDS else
                                 f"a frame of kind {kind} sent to the wrong side")
            if length > (self.max_body + 1024 if kind == CALL else
                         MAX_ERROR if kind == ERROR else
                         MAX_REPLY if kind == REPLY else self.max_body):
                raise FrameError(f"a {length}-byte frame (at most {self.max_body})")
            end = at + HEADER.size + length
            if len(buf) < end:
                break
            out.append(Frame(kind, status, call_id, bytes(buf[at + HEADER.size:end]), flags))
            at = end
        if at:
            del buf[:at]
        return out
