"""Maps loaded in part: what a rule may touch of the state one call loaded."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class NotLoaded(LookupError):
    """A rule touched state its store did not load for it: a bug in the store's plan."""


class Partial(dict):
    """A map loaded for some keys only (`loaded`; None: all of it).

    Reading or writing a key that was not loaded raises `NotLoaded` (it would otherwise read as
    absent). `len` counts the entries not loaded too (`unloaded`, when the store counted them;
    None: it did not, and `len` raises), so `not m` stays right; iterating needs the whole map;
    `clear` empties all of it (the store deletes the Redis hash).
    """

    __slots__ = ("cleared", "loaded", "unloaded")

    def __init__(self, entries: dict, loaded: Iterable | None, unloaded: int | None = 0
                 ) -> None:
        super().__init__(entries)
        self.loaded = None if loaded is None else set(loaded)
        self.unloaded = unloaded
        self.cleared = False

    def _check(self, key: object) -> None:
        if self.loaded is not None and key not in self.loaded:
            raise NotLoaded(key)

    def extend(self, entries: dict, loaded: Iterable) -> None:
        """Entries loaded in a later round, which `unloaded` counted so far."""
        if self.loaded is None:
            return
        fresh = [k for k in loaded if k not in self.loaded]
        self.loaded.update(fresh)
        found = {k: entries[k] for k in fresh if k in entries}
        dict.update(self, found)
        if self.unloaded is not None:
            self.unloaded = max(0, self.unloaded - len(found))

    def _whole(self) -> None:
        if self.unloaded != 0:
            raise NotLoaded("iterating a map loaded in part")

    # The three reads the rules make most (a decision: each weighed holder's record) check
    # inline: a call of `_check` each was most of their cost.
    def __getitem__(self, key: Any) -> Any:
        loaded = self.loaded
        if loaded is not None and key not in loaded:
            raise NotLoaded(key)
        return dict.__getitem__(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check(key)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: Any) -> None:
        self._check(key)
        dict.__delitem__(self, key)

    def __contains__(self, key: object) -> bool:
        loaded = self.loaded
        if loaded is not None and key not in loaded:
            raise NotLoaded(key)
        return dict.__contains__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        loaded = self.loaded
        if loaded is not None and key not in loaded:
            raise NotLoaded(key)
        return dict.get(self, key, default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._check(key)
        return dict.setdefault(self, key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self._check(key)
        return dict.pop(self, key, *default)

    def __len__(self) -> int:
        if self.unloaded is None:
            raise NotLoaded("the size of a map loaded in part, not counted")
        return dict.__len__(self) + self.unloaded

    def __iter__(self):
        self._whole()
        return dict.__iter__(self)

    def keys(self):
        self._whole()
        return dict.keys(self)

    def values(self):
        self._whole()
        return dict.values(self)

    def items(self):
        self._whole()
        return dict.items(self)

    def clear(self) -> None:
        dict.clear(self)
        self.loaded = None  # known now: empty
        self.unloaded = 0
        self.cleared = True
