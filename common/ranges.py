"""HTTP byte ranges (RFC 9110 §14) for a representation of known length, without I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC_RE = re.compile(r"^[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*$")


class InvalidRange(ValueError):
    """The Range header is malformed or asks for something we do not serve (answer 400)."""


class UnsatisfiableRange(ValueError):
    """The range is well formed but no byte of it exists (answer 416)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def content_range(self, length: int) -> str:
        return f"bytes {self.start}-{self.end}/{length}"


def parse_range(header: str | None, length: int) -> ByteRange | None:
    """The byte range a request asks for, or None for the whole representation.

    `a-b`, `a-` and `-n` are served; an end past the last byte is clipped. A single range only:
    mirror clients never send several, and a multipart answer would break those that copy the
    body into a buffer of the requested size.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise InvalidRange(f"unsupported range unit in {header[:100]!r}")
    if "," in spec:
        raise InvalidRange("multiple ranges are not supported")
    m = _SPEC_RE.match(spec)
    if not m or (not m.group(1) and not m.group(2)):
        raise InvalidRange(f"malformed range {header[:100]!r}")
    first, last = m.group(1), m.group(2)
    if len(first) > 19 or len(last) > 19:
        raise InvalidRange("range bound too large")
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or length == 0:
            raise UnsatisfiableRange(f"suffix of {n} bytes of a {length}-byte blob")
        return ByteRange(max(0, length - n), length - 1)
    start = int(first)
    end = int(last) if last else length - 1
    if last and end < start:
        raise InvalidRange(f"range end before start in {header[:100]!r}")
    if start >= length:
        raise UnsatisfiableRange(f"range starts at {start}, blob has {length} bytes")
    return ByteRange(start, min(end, length - 1))
