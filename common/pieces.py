"""Piece math: how a task of a given length is cut, and which pieces cover a byte range.

The piece size is a property of the task, fixed once by the scheduler and the same on every peer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20
MIN_PIECE_SIZE = 1 * MiB  # nydus's chunk and batch size
MAX_PIECE_SIZE = 16 * MiB
TARGET_PIECES = 1024


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def default_piece_size(length: int) -> int:
    """clamp(next_pow2(length / 1024), 1 MiB, 16 MiB)."""
    return max(MIN_PIECE_SIZE, min(MAX_PIECE_SIZE, next_pow2(-(-length // TARGET_PIECES))))


def valid_piece_size(size: int) -> bool:
    """Piece sizes are powers of two between 64 KiB and 64 MiB."""
    return 64 * KiB <= size <= 64 * MiB and size & (size - 1) == 0


def piece_count(length: int, piece_size: int) -> int:
    """How many pieces of `piece_size` hold `length` bytes."""
    return -(-length // piece_size)


@dataclass(frozen=True, slots=True)
class PieceLayout:
    length: int
    piece_size: int

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError("negative length")
        if self.piece_size <= 0:
            raise ValueError("piece size must be positive")

    @property
    def count(self) -> int:
        return piece_count(self.length, self.piece_size)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, size) of piece `index`."""
        if not 0 <= index < self.count:
            raise IndexError(f"piece {index} out of range 0..{self.count - 1}")
        start = index * self.piece_size
        return start, min(self.piece_size, self.length - start)

    def clip(self, index: int, start: int, end: int) -> tuple[int, int]:
        """The part of piece `index` inside bytes start..end (inclusive), as offsets within
        the piece: [lo, hi)."""
        first, size = self.span(index)
        return max(start, first) - first, min(end, first + size - 1) - first + 1

    def covering(self, start: int, end: int) -> range:
        """Indices of the pieces that hold bytes start..end (inclusive)."""
        if not 0 <= start <= end < self.length:
            raise ValueError(f"bytes {start}-{end} outside 0..{self.length - 1}")
        return range(start // self.piece_size, end // self.piece_size + 1)

    def runs(self, indices: Iterable[int], max_len: int) -> Iterator[tuple[int, int]]:
        """Group indices into runs of consecutive pieces (first, last), at most max_len long."""
        first = last = None
        for i in sorted(set(indices)):
            if first is not None and i == last + 1 and i - first < max_len:
                last = i
                continue
            if first is not None:
                yield first, last
            first = last = i
        if first is not None:
            yield first, last


def reader_first_order(pieces: Iterable[int], offset_piece: int) -> list[int]:
    """Pieces from the reader's offset onwards first, in order, then the ones before it.

    A client streaming a blob needs the pieces at its offset before anything else; the ones
    behind it are only wanted for completeness.
    """
    ahead = sorted(p for p in pieces if p >= offset_piece)
    behind = sorted(p for p in pieces if p < offset_piece)
    return ahead + behind
