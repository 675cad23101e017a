"""Unit tests for common/pieces.py: piece size, layout, covering pieces, runs and read order."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.pieces import (
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
    KiB,
    MiB,
    PieceLayout,
    default_piece_size,
    next_pow2,
    reader_first_order,
    valid_piece_size,
)

GiB = 1 << 30

# clamp(next_pow2(ceil(length / 1024)), 1 MiB, 16 MiB)
PIECE_SIZES = [
    (0, 1 * MiB),
    (1, 1 * MiB),
    (1 * MiB, 1 * MiB),
    (64 * MiB, 1 * MiB),
    (1 * GiB - 1, 1 * MiB),
    (1 * GiB, 1 * MiB),  # exactly 1024 pieces of 1 MiB
    (1 * GiB + 1, 2 * MiB),  # one byte more no longer fits in 1024 pieces of 1 MiB
    (2 * GiB, 2 * MiB),
    (2 * GiB + 1, 4 * MiB),
    (3 * GiB, 4 * MiB),
    (4 * GiB, 4 * MiB),
    (8 * GiB, 8 * MiB),
    (16 * GiB, 16 * MiB),
    (16 * GiB + 1, 16 * MiB),  # clamped at the top
    (100 * GiB, 16 * MiB),
    (1 << 50, 16 * MiB),
]


@pytest.mark.parametrize(("length", "size"), PIECE_SIZES)
def test_default_piece_size(length: int, size: int) -> None:
    assert default_piece_size(length) == size


@given(st.integers(min_value=0, max_value=1 << 50))
def test_default_piece_size_is_a_clamped_power_of_two(length: int) -> None:
    size = default_piece_size(length)
    assert MIN_PIECE_SIZE <= size <= MAX_PIECE_SIZE
    assert size & (size - 1) == 0
    assert valid_piece_size(size)
    # at most 1024 pieces unless the size is at its cap
    if size < MAX_PIECE_SIZE:
        assert PieceLayout(length, size).count <= 1024
    # and no smaller allowed power of two would do
    if size > MIN_PIECE_SIZE:
        assert PieceLayout(length, size // 2).count > 1024


@pytest.mark.parametrize(("n", "p"), [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8),
                                      (1023, 1024), (1024, 1024), (1025, 2048)])
def test_next_pow2(n: int, p: int) -> None:
    assert next_pow2(n) == p


@pytest.mark.parametrize(("size", "ok"), [
    (64 * KiB, True), (128 * KiB, True), (1 * MiB, True), (64 * MiB, True),
    (32 * KiB, False), (128 * MiB, False), (3 * MiB, False), (0, False), (-MiB, False),
    (64 * KiB + 1, False), (MiB - 1, False),
])
def test_valid_piece_size(size: int, ok: bool) -> None:
    assert valid_piece_size(size) is ok


# --- layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("length", "piece", "count"), [
    (0, MiB, 0), (1, MiB, 1), (MiB - 1, MiB, 1), (MiB, MiB, 1), (MiB + 1, MiB, 2),
    (10 * MiB, MiB, 10), (10 * MiB + 5, MiB, 11), (10, 4, 3), (12, 4, 3),
])
def test_count(length: int, piece: int, count: int) -> None:
    assert PieceLayout(length, piece).count == count


def test_span_full_and_short_last_piece() -> None:
    layout = PieceLayout(10, 4)
    assert [layout.span(i) for i in range(3)] == [(0, 4), (4, 4), (8, 2)]
    exact = PieceLayout(12, 4)
    assert exact.span(2) == (8, 4)


@pytest.mark.parametrize("index", [-1, 3, 4, 100])
def test_span_out_of_range(index: int) -> None:
    with pytest.raises(IndexError):
        PieceLayout(10, 4).span(index)


def test_span_of_empty_blob_raises() -> None:
    with pytest.raises(IndexError):
        PieceLayout(0, 4).span(0)


@pytest.mark.parametrize(("length", "piece"), [(-1, 4), (10, 0), (10, -4)])
def test_layout_rejects_bad_values(length: int, piece: int) -> None:
    with pytest.raises(ValueError):
        PieceLayout(length, piece)


@pytest.mark.parametrize(("start", "end", "pieces"), [
    (0, 0, [0]),
    (0, 3, [0]),  # exactly one piece
    (3, 4, [0, 1]),  # straddles a boundary
    (4, 7, [1]),
    (4, 8, [1, 2]),
    (0, 9, [0, 1, 2]),  # the whole blob, short last piece
    (8, 9, [2]),
    (9, 9, [2]),  # last byte
    (7, 8, [1, 2]),
])
def test_covering(start: int, end: int, pieces: list[int]) -> None:
    assert list(PieceLayout(10, 4).covering(start, end)) == pieces


@pytest.mark.parametrize(("start", "end"), [(-1, 3), (0, 10), (5, 4), (10, 10), (0, 100)])
def test_covering_rejects_bytes_outside_the_blob(start: int, end: int) -> None:
    with pytest.raises(ValueError):
        PieceLayout(10, 4).covering(start, end)


def test_covering_of_empty_blob_raises() -> None:
    with pytest.raises(ValueError):
        PieceLayout(0, 4).covering(0, 0)


@st.composite
def layout_and_range(draw: st.DrawFn) -> tuple[PieceLayout, int, int]:
    piece = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 64, 1000]))
    length = draw(st.integers(min_value=1, max_value=20_000))
    start = draw(st.integers(min_value=0, max_value=length - 1))
    end = draw(st.integers(min_value=start, max_value=length - 1))
    return PieceLayout(length, piece), start, end


@given(layout_and_range())
def test_covering_spans_cover_exactly_the_range(case: tuple[PieceLayout, int, int]) -> None:
    layout, start, end = case
    pieces = list(layout.covering(start, end))
    assert pieces, "a non-empty range is held by at least one piece"
    assert pieces == list(range(pieces[0], pieces[-1] + 1)), "covering pieces are consecutive"
    spans = [layout.span(i) for i in pieces]
    # spans are contiguous and non-overlapping
    for (off, size), (next_off, _) in itertools.pairwise(spans):
        assert off + size == next_off
    lo = spans[0][0]
    hi = spans[-1][0] + spans[-1][1] - 1
    # together they hold every byte of start..end ...
    assert lo <= start and end <= hi
    # ... and nothing beyond the first and last piece: dropping either would lose a byte
    assert start < lo + spans[0][1]
    assert end >= spans[-1][0]
    assert hi < layout.length


@given(st.integers(min_value=0, max_value=50_000), st.sampled_from([1, 3, 4, 1024, 4096]))
def test_spans_tile_the_whole_blob(length: int, piece: int) -> None:
    layout = PieceLayout(length, piece)
    offset = 0
    for i in range(layout.count):
        off, size = layout.span(i)
        assert off == offset
        assert 0 < size <= piece
        if i < layout.count - 1:
            assert size == piece
        offset += size
    assert offset == length


# --- runs -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("indices", "max_len", "runs"), [
    ([], 4, []),
    ([0], 4, [(0, 0)]),
    ([0, 1, 2, 3], 4, [(0, 3)]),
    ([0, 1, 2, 3, 4], 4, [(0, 3), (4, 4)]),
    ([0, 1, 2, 3, 4, 5, 6, 7, 8], 4, [(0, 3), (4, 7), (8, 8)]),
    ([0, 2, 4], 4, [(0, 0), (2, 2), (4, 4)]),
    ([5, 3, 4, 1, 0], 16, [(0, 1), (3, 5)]),  # unsorted input
    ([1, 1, 2, 2, 3], 16, [(1, 3)]),  # duplicates
    ([0, 1, 2], 1, [(0, 0), (1, 1), (2, 2)]),
    ([7, 8, 9, 10, 20, 21], 2, [(7, 8), (9, 10), (20, 21)]),
])
def test_runs(indices: list[int], max_len: int, runs: list[tuple[int, int]]) -> None:
    assert list(PieceLayout(100, 1).runs(indices, max_len)) == runs


@given(st.sets(st.integers(min_value=0, max_value=200)), st.integers(min_value=1, max_value=20))
def test_runs_partition_the_indices(indices: set[int], max_len: int) -> None:
    runs = list(PieceLayout(1000, 1).runs(indices, max_len))
    covered = [i for first, last in runs for i in range(first, last + 1)]
    assert covered == sorted(indices), "every index once, in order, nothing extra"
    for first, last in runs:
        assert 1 <= last - first + 1 <= max_len
    # a run only ends early when the next index is not adjacent or the run is full
    for (f1, l1), (f2, _) in itertools.pairwise(runs):
        assert f2 > l1 + 1 or l1 - f1 + 1 == max_len


# --- reader-first order ---------------------------------------------------------------------

@pytest.mark.parametrize(("pieces", "offset", "order"), [
    ([0, 1, 2, 3], 0, [0, 1, 2, 3]),
    ([0, 1, 2, 3], 2, [2, 3, 0, 1]),
    ([3, 1, 0, 2], 2, [2, 3, 0, 1]),
    ([0, 1, 2, 3], 4, [0, 1, 2, 3]),  # offset beyond: everything is behind, in order
    ([5, 6, 9], 7, [9, 5, 6]),  # offset piece itself not wanted
    ([], 3, []),
])
def test_reader_first_order(pieces: list[int], offset: int, order: list[int]) -> None:
    assert reader_first_order(pieces, offset) == order


@given(st.sets(st.integers(min_value=0, max_value=100)), st.integers(min_value=0, max_value=100))
def test_reader_first_order_is_a_permutation(pieces: set[int], offset: int) -> None:
    order = reader_first_order(pieces, offset)
    assert sorted(order) == sorted(pieces)
    ahead = [p for p in order if p >= offset]
    assert order[:len(ahead)] == sorted(ahead)
    assert order[len(ahead):] == sorted(p for p in pieces if p < offset)


def test_clip_gives_a_range_s_part_of_each_piece() -> None:
    layout = PieceLayout(10, 4)  # pieces 0-3, 4-7, 8-9
    assert [layout.clip(i, 3, 8) for i in layout.covering(3, 8)] == [(3, 4), (0, 4), (0, 1)]
    assert layout.clip(1, 5, 5) == (1, 2)
    assert layout.clip(2, 0, 9) == (0, 2)  # the short last piece
