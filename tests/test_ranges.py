"""Unit tests for common/ranges.py: HTTP byte ranges (RFC 9110 §14.1.2) against a known length."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.ranges import ByteRange, InvalidRange, UnsatisfiableRange, parse_range

# (header, length, expected (start, end) inclusive)
SATISFIABLE = [
    # a-b
    ("bytes=0-0", 10, (0, 0)),
    ("bytes=0-9", 10, (0, 9)),
    ("bytes=2-5", 10, (2, 5)),
    ("bytes=9-9", 10, (9, 9)),
    ("bytes=0-499", 1000, (0, 499)),
    ("bytes=500-999", 1000, (500, 999)),
    # end past the last byte is clipped
    ("bytes=0-10", 10, (0, 9)),
    ("bytes=5-1000000", 10, (5, 9)),
    ("bytes=0-9999999999999999999", 10, (0, 9)),  # 19 digits: the largest bound accepted
    ("bytes=9-100", 10, (9, 9)),
    # a-
    ("bytes=0-", 10, (0, 9)),
    ("bytes=3-", 10, (3, 9)),
    ("bytes=9-", 10, (9, 9)),
    ("bytes=0-", 1, (0, 0)),
    # -n: the last n bytes
    ("bytes=-1", 10, (9, 9)),
    ("bytes=-3", 10, (7, 9)),
    ("bytes=-10", 10, (0, 9)),
    ("bytes=-11", 10, (0, 9)),  # more than the whole blob: the whole blob
    ("bytes=-9999999999999999999", 10, (0, 9)),
    ("bytes=-1", 1, (0, 0)),
    # leading zeros are digits like any other
    ("bytes=007-008", 10, (7, 8)),
    # the range unit is case-insensitive (RFC 9110 §14.1)
    ("Bytes=1-2", 10, (1, 2)),
    ("BYTES=1-2", 10, (1, 2)),
    # optional whitespace around the unit, the numbers and the range spec
    ("bytes= 1-2", 10, (1, 2)),
    ("bytes=1-2 ", 10, (1, 2)),
    (" bytes=1-2", 10, (1, 2)),
    ("bytes=\t1-2\t", 10, (1, 2)),
    ("bytes=1 - 2", 10, (1, 2)),
    ("bytes= -3", 10, (7, 9)),
    ("bytes=3- ", 10, (3, 9)),
]


@pytest.mark.parametrize(("header", "length", "expected"), SATISFIABLE)
def test_satisfiable(header: str, length: int, expected: tuple[int, int]) -> None:
    r = parse_range(header, length)
    assert r == ByteRange(*expected)
    assert r.size == expected[1] - expected[0] + 1
    assert r.content_range(length) == f"bytes {expected[0]}-{expected[1]}/{length}"


def test_no_header_is_whole_representation() -> None:
    assert parse_range(None, 10) is None
    assert parse_range(None, 0) is None


UNSATISFIABLE = [
    ("bytes=10-", 10),  # start == length
    ("bytes=10-20", 10),
    ("bytes=11-", 10),
    ("bytes=1000-2000", 10),
    ("bytes=9999999999999999999-", 10),
    ("bytes=-0", 10),  # a suffix of zero bytes
    ("bytes=-0", 0),
    # the empty blob has no byte to serve
    ("bytes=0-", 0),
    ("bytes=0-0", 0),
    ("bytes=0-100", 0),
    ("bytes=-1", 0),
    ("bytes=-100", 0),
]


@pytest.mark.parametrize(("header", "length"), UNSATISFIABLE)
def test_unsatisfiable_is_416(header: str, length: int) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, length)


INVALID = [
    # not the bytes unit
    "items=0-1",
    "byte=0-1",
    "bytesx=0-1",
    "0-1",
    "bytes 0-1",
    "bytes:0-1",
    "",
    "=0-1",
    # several ranges: never served
    "bytes=0-1,2-3",
    "bytes=0-1, 5-6",
    "bytes=-1,0-0",
    "bytes=0-1,",
    # malformed specs
    "bytes=",
    "bytes=-",
    "bytes= - ",
    "bytes=abc",
    "bytes=a-b",
    "bytes=1",
    "bytes=1-2-3",
    "bytes=--1",
    "bytes=+1-2",
    "bytes=1-+2",
    "bytes=0x10-0x20",
    "bytes=1.5-2",
    "bytes=-1.5",
    "bytes=1e3-",
    "bytes=1 2-3",
    "bytes=0-1;x",
    "bytes=0-1=2",
    # end before start
    "bytes=5-3",
    "bytes=1-0",
    "bytes=9999999999999999999-0",
    # bounds with more than 19 digits (beyond any 64-bit length)
    "bytes=0-99999999999999999999",
    "bytes=99999999999999999999-",
    "bytes=-99999999999999999999",
    "bytes=" + "1" * 4000 + "-",
    "bytes=00000000000000000000-1",
]


@pytest.mark.parametrize("header", INVALID)
@pytest.mark.parametrize("length", [0, 1, 10])
def test_invalid_is_400(header: str, length: int) -> None:
    with pytest.raises(InvalidRange):
        parse_range(header, length)


def test_errors_are_distinct_value_errors() -> None:
    # A handler maps one to 400 and the other to 416: neither may be a subclass of the other.
    assert issubclass(InvalidRange, ValueError)
    assert issubclass(UnsatisfiableRange, ValueError)
    assert not issubclass(InvalidRange, UnsatisfiableRange)
    assert not issubclass(UnsatisfiableRange, InvalidRange)


def test_error_message_is_bounded_for_huge_headers() -> None:
    with pytest.raises(InvalidRange) as info:
        parse_range("bogus=" + "x" * 100_000, 10)
    assert len(str(info.value)) < 300


def test_end_before_start_is_invalid_even_when_unsatisfiable() -> None:
    # RFC 9110: a last-pos below first-pos makes the spec syntactically invalid, whatever the
    # length, so it is a 400 and never a 416.
    with pytest.raises(InvalidRange):
        parse_range("bytes=50-20", 10)


@pytest.mark.parametrize("header", ["bytes=\u0661-\u0662", "bytes=\uff11-\uff12",
                                    "bytes=-\u0663"])
def test_non_ascii_digits_are_invalid(header: str) -> None:
    with pytest.raises(InvalidRange):
        parse_range(header, 10)


# --- property: agrees with an independent reading of RFC 9110 ---------------------------------


def reference(kind: str, a: int | None, b: int | None, data: bytes) -> bytes | str:
    """What RFC 9110 §14.1.2 says the selected bytes are, via plain slicing; '416' if none."""
    n = len(data)
    if kind == "suffix":
        assert b is not None
        if b == 0 or n == 0:
            return "416"
        return data[-b:]  # Python clamps a too-long suffix to the whole sequence
    assert a is not None
    if a >= n:
        return "416"
    if kind == "open":
        return data[a:]
    assert b is not None and b >= a
    return data[a:b + 1]


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[str, str, int | None, int | None]:
    kind = draw(st.sampled_from(["closed", "open", "suffix"]))
    big = st.integers(min_value=0, max_value=2500)
    ws = st.sampled_from(["", " ", "\t", "  "])
    unit = draw(st.sampled_from(["bytes", "Bytes", "BYTES"]))
    pre, post = draw(ws), draw(ws)
    if kind == "closed":
        a = draw(big)
        b = a + draw(st.integers(min_value=0, max_value=2500))
        spec = f"{a}-{b}"
    elif kind == "open":
        a, b = draw(big), None
        spec = f"{a}-"
    else:
        a, b = None, draw(big)
        spec = f"-{b}"
    return kind, f"{unit}={pre}{spec}{post}", a, b


@given(length=st.integers(min_value=0, max_value=2000), h=valid_headers())
def test_slice_matches_rfc_reference(length: int, h: tuple[str, str, int | None, int | None]
                                     ) -> None:
    kind, header, a, b = h
    data = bytes(i % 251 for i in range(length))
    expected = reference(kind, a, b, data)
    if expected == "416":
        with pytest.raises(UnsatisfiableRange):
            parse_range(header, length)
        return
    r = parse_range(header, length)
    assert r is not None
    assert 0 <= r.start <= r.end < length
    got = data[r.start:r.end + 1]
    assert got == expected
    assert r.size == len(expected) > 0
    assert r.content_range(length) == f"bytes {r.start}-{r.end}/{length}"


@given(length=st.integers(min_value=0, max_value=10**6),
       text=st.text(alphabet="bytes=0123456789-, \tx", max_size=30))
def test_any_text_either_parses_in_bounds_or_raises_a_range_error(length: int, text: str) -> None:
    try:
        r = parse_range(text, length)
    except (InvalidRange, UnsatisfiableRange):
        return
    assert r is not None
    assert 0 <= r.start <= r.end < length
