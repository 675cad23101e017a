"""A daemon's memory: what it is made of, on demand, and malloc's free memory handed back.

Reports (off by default: SIGUSR1's default action is to kill): with NAIAD_MEMORY_REPORT=1 in its
environment a daemon logs one on each SIGUSR1. A report tells a leak from allocator high water:
RSS and anonymous memory (/proc); what glibc's malloc holds in use and free (`mallinfo2`) and in
how many heaps (one per arena); the Python objects the collector tracks, by type (those made
since start-up, which is frozen); and, when tracemalloc traces (PYTHONTRACEMALLOC=1), the memory
Python allocated and the source lines that grew most since the first report. Python objects
that keep growing are a leak; flat Python and malloc "used" under a growing malloc "free" are
the allocator keeping freed memory, which `Trimmer` hands back.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import re
import signal
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from common.tasks import Activity

ENV = "NAIAD_MEMORY_REPORT"
TOP = 12  # lines of each ranking in a report
KiB = 1024
TRIM_EVERY = 10.0  # seconds between two looks at the resident memory
TRIM_QUIET = 2.0  # seconds without a transfer before a trim (as the scrubber's QUIET_SECONDS)
TRIM_GROWTH = 8 * KiB  # KiB of anonymous memory grown since the last trim that make it trim
log = logging.getLogger("naiad.memory")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2  # glibc >= 2.33; AttributeError elsewhere
        libc.fdopen.restype = ctypes.c_void_p
        libc.fdopen.argtypes = (ctypes.c_int, ctypes.c_char_p)
        libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
        libc.fclose.argtypes = (ctypes.c_void_p,)
    except (OSError, AttributeError):
        return None
    return libc


M_ARENA_MAX = -8  # mallopt parameter, glibc's malloc.h


def one_arena() -> bool:
    """One malloc arena for every thread (glibc; whether set). Python allocates under the GIL,
    so an arena per thread buys no parallelism, and each arena keeps its own high water of
    freed piece buffers. Call before worker threads first allocate."""
    libc = _libc()
    return libc is not None and libc.mallopt(M_ARENA_MAX, 1) == 1


def anonymous_kib() -> int:
    """This process's resident anonymous memory (RssAnon), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise OSError("no RssAnon in /proc/self/status")


def process_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak) from /proc/PID/status, Anonymous from smaps_rollup, in KiB."""
    out: dict[str, int] = {}
    for path, keys in ((f"/proc/{pid}/status", ("VmRSS", "VmHWM")),
                       (f"/proc/{pid}/smaps_rollup", ("Anonymous",))):
        try:
            for line in Path(path).read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0])
        except OSError:
            continue
    return out


def malloc_kib() -> dict[str, int] | None:
    """glibc malloc, every arena summed, in KiB: `heap` obtained from the system (sbrk and
    mmap'd heaps), `used` and `free` within it (pages a trim gave back still count as free),
    `mmapped` (large blocks outside the heaps), and `heaps` (the main arena's and one or more
    per extra arena). None without glibc."""
    libc = _libc()
    if libc is None:
        return None
    m = libc.mallinfo2()
    out = {"heap": m.arena // KiB, "used": m.uordblks // KiB, "free": m.fordblks // KiB,
           "mmapped": m.hblkhd // KiB}
    with tempfile.TemporaryFile() as f:  # malloc_info writes XML to a FILE*
        fp = libc.fdopen(os.dup(f.fileno()), b"w")
        if fp:
            libc.malloc_info(0, fp)
            libc.fclose(fp)
            f.seek(0)
            out["heaps"] = len(re.findall(rb"<heap nr=", f.read()))
    return out


class Reporter:
    """Reports, each compared with the first: the first is the baseline."""

    def __init__(self, top: int = TOP) -> None:
        self.top = top
        self._types: Counter[str] | None = None
        self._snapshot: tracemalloc.Snapshot | None = None

    def lines(self) -> list[str]:
        proc = process_kib()
        head = " ".join(f"{k}={v // KiB}MiB" for k, v in proc.items())
        malloc = malloc_kib()
        if malloc is not None:
            head += " malloc " + " ".join(
                f"{k}={v}" if k == "heaps" else f"{k}={v // KiB}MiB" for k, v in malloc.items())
        types = Counter(type(o).__name__ for o in gc.get_objects())
        head += f" gc-objects={sum(types.values())}"
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            head += f" python={current >> 20}MiB python-peak={peak >> 20}MiB"
        out = [f"memory: {head}"]
        base_types, self._types = self._types, self._types or types
        if base_types is not None:
            grown = sorted(((n - base_types.get(t, 0), t, n) for t, n in types.items()),
                           reverse=True)[:self.top]
            out += [f"memory: objects {t}: {n} ({d:+d})" for d, t, n in grown if d]
        else:
            out += [f"memory: objects {t}: {n}" for t, n in types.most_common(self.top)]
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            if self._snapshot is None:
                self._snapshot = snap
                stats = snap.statistics("lineno")[:self.top]
                out += [f"memory: python {s}" for s in stats]
            else:
                diff = snap.compare_to(self._snapshot, "lineno")[:self.top]
                out += [f"memory: python {s}" for s in diff if s.size_diff]
        return out


def install(loop: asyncio.AbstractEventLoop, log: logging.Logger) -> Callable[[], None]:
    """With NAIAD_MEMORY_REPORT set, log a report on each SIGUSR1; the function that removes
    the handler (nothing to remove when off)."""
    if not os.environ.get(ENV):
        return lambda: None
    reporter = Reporter()

    def report() -> None:
        for line in reporter.lines():
            log.info("%s", line)

    loop.add_signal_handler(signal.SIGUSR1, report)
    return lambda: loop.remove_signal_handler(signal.SIGUSR1)


def trim_due(resident_kib: int, after_last_kib: int, growth_kib: int = TRIM_GROWTH) -> bool:
    """Whether resident memory grew enough since the last trim to trim again."""
    return resident_kib - after_last_kib > growth_kib


class Trimmer:
    """Hands the memory glibc's malloc holds free back to the system (`malloc_trim(0)`: every
    whole free page of every arena) once the peer is quiet, if its resident anonymous memory
    grew TRIM_GROWTH since the last trim. Piece buffers (1 MiB and up) come from malloc's heap,
    and a freed one stays resident: after a burst of pulls a peer kept its high water for good.
    Not under load: there the pages a trim gave back were all touched again within 3 s (the
    soak, docs/reliability.md), each costing its first touch again, for nothing."""

    def __init__(self, parts: list[Activity], growth_kib: int = TRIM_GROWTH,
                 resident: Callable[[], int] = anonymous_kib,
                 trim: Callable[[], object] | None = None) -> None:
        self.parts = parts
        self.growth_kib = growth_kib
        self._resident = resident
        libc = _libc() if trim is None else None
        self._trim = trim or (None if libc is None else lambda: libc.malloc_trim(0))
        self.after = resident()  # resident after the last trim (or at the start)
        self.trims = 0

    def quiet(self) -> bool:
        """Every part idle for TRIM_QUIET seconds."""
        return all(p.idle.is_set() and p.quiet_for() >= TRIM_QUIET for p in self.parts)

    async def once(self) -> bool:
        """Trim if quiet and due; whether it did."""
        now = self._resident()
        self.after = min(self.after, now)  # shrank by itself: grown counts from there
        if self._trim is None or not self.quiet() or not trim_due(now, self.after,
                                                                  self.growth_kib):
            return False
        await asyncio.to_thread(self._trim)  # off the loop: ctypes lets go of the GIL
        self.after = self._resident()
        self.trims += 1
        log.debug("malloc trim: anonymous memory %d -> %d MiB", now // KiB, self.after // KiB)
        return True

    async def run(self, every: float = TRIM_EVERY) -> None:
        """Look every `every` seconds, for good; done at once without glibc."""
        while self._trim is not None:
            await asyncio.sleep(every)
            await self.once()
