"""The disk budget, without I/O: how much may be cached and what to evict down to.

Two limits: `--disk-quota` (above QUOTA_HIGH of it, evict least recently used tasks down to
QUOTA_LOW; never past the quota), and, quota or not, a free-space floor on the store's
filesystem (FREE_FLOOR_SHARE of it, at most FREE_FLOOR_MAX) so the index can always be written
and evictions recorded: below it nothing is cached, and eviction frees twice the floor.
Figures are bytes; `reserve` is the bytes about to be written (chunk writes under way count as
stored).
"""

from __future__ import annotations

from dataclasses import dataclass

QUOTA_HIGH, QUOTA_LOW = 0.95, 0.85  # --disk-quota watermarks: evict above high, down to low
FREE_FLOOR_SHARE, FREE_FLOOR_MAX = 0.05, 1 << 30


@dataclass(frozen=True)
class Floor:
    """Bytes free on the store's filesystem, and bytes to keep free."""

    free: int
    keep: int

    @classmethod
    def of(cls, space: tuple[int, int] | None) -> Floor | None:
        """From (bytes available, filesystem size); None if unknown."""
        if space is None:
            return None
        return cls(space[0], min(FREE_FLOOR_MAX, int(FREE_FLOOR_SHARE * space[1])))

    def room(self, reserve: int) -> bool:
        return self.free - reserve >= self.keep

    def evict_to(self, stored: int, reserve: int) -> int:
        """Store size that leaves twice the floor free after writing `reserve`."""
        return stored - (2 * self.keep + reserve - self.free)


@dataclass(frozen=True)
class DiskBudget:
    quota: int | None = None  # --disk-quota

    def quota_evict_to(self, stored: int, reserve: int) -> int | None:
        """Store size to evict down to before writing `reserve`, or None: no need."""
        if self.quota is not None and stored + reserve > QUOTA_HIGH * self.quota:
            return int(QUOTA_LOW * self.quota) - reserve
        return None

    def over_quota(self, stored: int, reserve: int) -> bool:
        return self.quota is not None and stored + reserve > self.quota

    @staticmethod
    def full_evict_to(stored: int, floor: Floor | None) -> int:
        """After a write failed for want of space: a quarter of the store, or enough to leave
        twice the floor free, whichever is more."""
        target = stored * 3 // 4
        if floor is not None:
            target = min(target, stored - (2 * floor.keep - floor.free))
        return target
