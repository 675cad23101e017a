"""The framed peer-to-peer transport's wire format (transport 2), pure: no sockets.

A child opens a connection to a parent's upload port with PREFACE (the port tells it apart
from HTTP by those bytes), then a HELLO; the parent answers WELCOME or ERROR (and closes). Then
the child sends REQUESTs, several in flight, and the parent answers each with one PIECE frame:
a header naming the request, its status and encoding, and `length` bytes of body (the chunk's
bytes, or a reason). Answers come whole, one after another, in any order.

Every frame is a fixed HEADER then its body:

    kind u8 | status u8 | encoding u8 | reserved u8 | request id u32 | body length u64

HELLO's body is `version u16` then the cluster secret's signature (`common.auth.sign` over
method HELLO and path /p2p/<version>: one per connection, its nonce admitted once); WELCOME's is
`version u16 | window u16` (the requests the parent takes from one address at once, its
per-address upload slots); REQUEST's is `size u64` then the chunk id, ASCII, and optionally a
newline and the request id of the pull it serves (X-Request-Id on the HTTP path, so one pull
can be followed into the parent's logs), with `encoding` ZSTD if the child accepts a compressed
answer and `status` the request's priority.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from common import auth

VERSION = 2  # peers register it; 1 is HTTP only (peer/parents.py)
PREFACE = b"NAIAD-P2P/2\r\n"
HEADER = struct.Struct("!BBBxIQ")
HELLO, WELCOME, REQUEST, PIECE, ERROR = 1, 2, 3, 4, 5
OK, BUSY, MISSING, FAILED = 0, 1, 2, 3  # PIECE status
RAW, ZSTD = 0, 1  # PIECE encoding; REQUEST: what the child accepts
MAX_CONTROL = 4 << 10  # any frame but a PIECE that is OK: a bound on what a peer buffers
PACKED_SLACK = 64 << 10  # a compressed piece may be at most this larger than the piece
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_WELCOME = struct.Struct("!HH")


class FrameError(ValueError):
    """Bytes that are not this protocol: the connection cannot go on."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    status: int
    encoding: int
    request: int
    length: int


def header(kind: int, request: int = 0, length: int = 0, status: int = 0,
           encoding: int = RAW) -> bytes:
    return HEADER.pack(kind, status, encoding, request, length)


def parse_header(data: bytes | bytearray | memoryview) -> Frame:
    kind, status, encoding, request, length = HEADER.unpack(data)
    if kind not in (HELLO, WELCOME, REQUEST, PIECE, ERROR):
        raise FrameError(f"unknown frame kind {kind}")
    if encoding not in (RAW, ZSTD):
        raise FrameError(f"unknown encoding {encoding}")
    if kind == PIECE and status not in (OK, BUSY, MISSING, FAILED):
        raise FrameError(f"unknown piece status {status}")
    if length > MAX_CONTROL and not (kind == PIECE and status == OK):
        raise FrameError(f"a {length}-byte control frame")
    return Frame(kind, status, encoding, request, length)


def frame(kind: int, body: bytes, request: int = 0, status: int = 0,
          encoding: int = RAW) -> bytes:
    return header(kind, request, len(body), status, encoding) + body


def hello(secret: bytes | None) -> bytes:
    """PREFACE and HELLO: what a child sends first."""
    signature = auth.sign(secret, "HELLO", f"/p2p/{VERSION}") if secret is not None else ""
    return PREFACE + frame(HELLO, _U16.pack(VERSION) + signature.encode())


def parse_hello(body: bytes) -> tuple[int, str]:
    """The version and signature of a HELLO body."""
    if len(body) < _U16.size:
        raise FrameError("HELLO too short")
    return _U16.unpack_from(body)[0], body[_U16.size:].decode("ascii", "replace")


def check_hello(verifier: auth.Verifier | None, body: bytes) -> None:
    """AuthError (its reason for the ERROR frame) unless the HELLO may go on."""
    version, signature = parse_hello(body)
    if version != VERSION:
        raise auth.AuthError(f"transport version {version} not spoken here (only {VERSION})")
    if verifier is not None:
        verifier.check(signature or None, "HELLO", f"/p2p/{VERSION}")


def welcome(window: int) -> bytes:
    return frame(WELCOME, _WELCOME.pack(VERSION, min(window, 0xFFFF)))


def parse_welcome(body: bytes) -> int:
    """The window a WELCOME offers."""
    if len(body) != _WELCOME.size:
        raise FrameError("WELCOME of the wrong size")
    version, window = _WELCOME.unpack(body)
    if version != VERSION:
        raise FrameError(f"parent speaks transport {version}")
    return max(1, window)


def request(request_id: int, chunk: str, size: int, priority: int, accept_zstd: bool,
            trace: str | None = None) -> bytes:
    body = _U64.pack(size) + chunk.encode() + (b"\n" + trace.encode() if trace else b"")
    return frame(REQUEST, body, request_id, priority, ZSTD if accept_zstd else RAW)


def parse_request(body: bytes) -> tuple[int, str, str | None]:
    """The (size, chunk id, request id or None) of a REQUEST body; the caller checks the chunk
    id and adopts the request id only if it is well formed."""
    if len(body) <= _U64.size:
        raise FrameError("REQUEST too short")
    chunk, _, trace = body[_U64.size:].decode("ascii", "replace").partition("\n")
    return _U64.unpack_from(body)[0], chunk, trace or None


def piece_limit(size: int, encoding: int) -> int:
    """The most bytes an OK answer to a request for `size` bytes may carry."""
    return size + PACKED_SLACK if encoding == ZSTD else size
