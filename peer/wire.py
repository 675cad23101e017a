"""zstd on the wire between peers: a chunk travels compressed only if that makes it at least
10% smaller, decided once per chunk; the receiver decompresses into at most the piece's size
(no decompression bombs) and then verifies the chunk id as for any piece."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import BinaryIO

import zstandard

ENCODING = "zstd"
LEVEL = 3
MIN_SAVING = 0.10
SAMPLE = 64 << 10


class WireError(ValueError):
    pass


def worth_it(raw: int, packed: int) -> bool:
    return packed <= (1 - MIN_SAVING) * raw


def pack(data: bytes) -> bytes | None:
    """The compressed chunk, or None when compressing does not pay. Layers are mostly gzip or
    zstd already: a 64 KiB sample that does not shrink spares compressing the whole chunk."""
    return _pack(io.BytesIO(data), len(data))


def pack_file(path: Path) -> bytes | None:
    """`pack` for a stored chunk, reading only the sample when the sample does not shrink."""
    with open(path, "rb") as f:
        return _pack(f, os.fstat(f.fileno()).st_size)


def _pack(f: BinaryIO, size: int) -> bytes | None:
    if size > 2 * SAMPLE and _compress(f.read(SAMPLE)) is None:
        return None
    f.seek(0)
    return _compress(f.read())


def sample_says_raw(fd: int, size: int) -> bool | None:
    """Whether `pack_file` would give up on a stored chunk at its sample, told from the page
    cache alone (RWF_NOWAIT) so that the event loop may ask (tens of microseconds, against a
    worker thread's hand-off, several times that): None when it cannot be told so, for want
    of a sample (a small chunk), of the bytes in memory or of RWF_NOWAIT."""
    if size <= 2 * SAMPLE or _NOWAIT is None:
        return None
    buf = bytearray(SAMPLE)
    try:
        got = os.preadv(fd, [buf], 0, _NOWAIT)
    except OSError:  # EAGAIN: not in memory; EOPNOTSUPP: not on this filesystem
        return None
    if got != SAMPLE:
        return None
    return _compress(bytes(buf)) is None


_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


def _compress(data: bytes) -> bytes | None:
    packed = _compressor().compress(data)
    return packed if worth_it(len(data), len(packed)) else None


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's compressor (one is not to be shared between threads): making one per
    call cost twice the trial of a 64 KiB sample."""
    c = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=LEVEL)
    return c


def unpack(data: bytes, size: int) -> bytes:
    """Decompress a chunk that must be exactly `size` bytes. Streamed and cut at size + 1: a
    frame header claiming more (a bomb) never gets memory for it."""
    parts, got = [], 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            while got <= size:
                part = reader.read(size + 1 - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
    except zstandard.ZstdError as e:
        raise WireError(f"bad zstd stream: {e}") from None
    if got != size:
        raise WireError(f"decompressed {got}{'+' if got > size else ''} bytes, "
                        f"piece has {size}")
    return b"".join(parts)
