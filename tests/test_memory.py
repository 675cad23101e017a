"""Memory (common/memory.py): reports of what grew since the first, by object type and, when
tracemalloc traces, by source line; on a real peer, one report per SIGUSR1 when
NAIAD_MEMORY_REPORT is set. One malloc arena for every thread; the trimmer: when it trims, and
that a trim hands back the piece buffers malloc kept after they were freed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import memory
from common.tasks import Activity
from tests.cluster import Cluster, Registry, fetch, push_blob, until

MiB = 1 << 20


class Kept:
    """Objects a test keeps, to be found in the report by their type."""


def test_a_report_names_the_type_and_the_line_that_grew_since_the_first() -> None:
    tracemalloc.start()
    try:
        reporter = memory.Reporter(top=5)
        first = reporter.lines()
        assert first[0].startswith("memory: VmHWM=")
        assert "python=" in first[0]
        kept = [Kept() for _ in range(5000)]  # the line that grows
        kept_blobs = [bytes(2000) for _ in range(2000)]
        second = reporter.lines()
    finally:
        tracemalloc.stop()
    assert "memory: objects Kept: 5000 (+5000)" in second
    grown = [line for line in second if "test_memory.py" in line]
    assert grown and "(+" in grown[0]  # the biggest growth first: the 4 MB of blobs
    assert len(kept) + len(kept_blobs) == 7000


def test_malloc_figures_add_up() -> None:
    m = memory.malloc_kib()
    assert m is not None  # glibc
    assert m["heaps"] >= 1
    assert m["used"] + m["free"] <= m["heap"] + 1  # KiB rounding


async def test_a_peer_logs_a_report_on_each_sigusr1_when_asked(
        tmp_path: Path, registry: Registry) -> None:
    """After a pull (its worker threads wrote, hashed and read pieces), in one malloc heap."""
    cluster = Cluster(tmp_path)
    try:
        sched = await cluster.scheduler()
        peer = await cluster.peer("p", sched.url, registry.url, env={memory.ENV: "1"})
        blob = os.urandom(6 * MiB + 12345)
        digest = await push_blob(registry.url, "memory/report", blob)
        for _ in range(2):  # from the registry, then from the store
            status, _, body = await fetch(f"{peer.url}/v2/memory/report/blobs/{digest}")
            assert (status, body == blob) == (200, True)
        for n in (1, 2):
            os.kill(peer.proc.popen.pid, signal.SIGUSR1)

            async def reported(n: int = n) -> bool:
                return peer.proc.logs().count("memory: VmHWM=") == n

            await until(reported, 10, f"report {n}")
        assert peer.proc.popen.poll() is None  # still serving
        logs = peer.proc.logs()
        assert "objects dict:" in logs
        assert " heaps=1 " in logs  # memory.one_arena() at start-up
    finally:
        cluster.stop()


# Worker threads allocating at once, as asyncio.to_thread's do; then how many heaps malloc has.
_THREADS = """
import sys
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from common import memory
from common.tasks import Activity
if sys.argv[1] == "one":
    assert memory.one_arena()
together = Barrier(6)
def work(_):
    together.wait()  # all six threads live at once
    return len([b"\\1" * 200_000 for _ in range(10)])
with ThreadPoolExecutor(6) as pool:
    list(pool.map(work, range(6)))
print(memory.malloc_kib()["heaps"])
"""


def test_one_arena_keeps_every_thread_in_one_heap() -> None:
    def heaps(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _THREADS, mode], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent.parent)
        return int(out.stdout)

    assert heaps("default") > 1  # glibc: an arena per thread, up to 8 per core
    assert heaps("one") == 1


async def test_the_trimmer_trims_when_quiet_and_grown_past_its_margin() -> None:
    now = 0.0
    part = Activity(clock=lambda: now)
    resident = iter([1000, 1050, 1200, 1200, 1200, 900, 950, 800, 950, 700])
    trims: list[int] = []
    t = memory.Trimmer([part], growth_kib=100, resident=resident.__next__,
                       trim=lambda: trims.append(1))
    assert t.after == 1000
    now = 10.0
    assert not await t.once()  # 1050: grown 50
    part.set_busy(True)
    assert not await t.once()  # 1200: grown 200, but a transfer is under way
    part.set_busy(False)
    now += memory.TRIM_QUIET - 0.5
    assert not await t.once()  # 1200, idle but not for long
    now += 0.5
    assert await t.once()  # 1200, quiet: trimmed, then 900 resident
    assert (t.after, trims) == (900, [1])
    assert not await t.once()  # 950
    assert not await t.once()  # 800: shrank by itself, the margin counts from there
    assert await t.once()  # 950: grown 150 since 800
    assert t.trims == 2


def _piece_buffers(n: int) -> list[bytes]:
    """Allocate n pieces of 1 MiB in this thread (its own malloc arena) and keep every other,
    as pieces in flight are freed in another order than they came."""
    pieces = [b"\1" * (MiB + 4096 * i) for i in range(n)]  # touches every page (bytes(n) won't)
    return pieces[::2]


async def test_a_trim_hands_back_the_piece_buffers_malloc_kept() -> None:
    block = b"\1" * (4 * MiB)  # a freed mmap'd block raises malloc's threshold: pieces come from
    del block  # its heaps
    trimmer = memory.Trimmer([], growth_kib=16 * 1024)  # no parts: quiet
    with ThreadPoolExecutor(4) as pool:  # as asyncio.to_thread's workers
        kept = [b for f in [pool.submit(_piece_buffers, 24) for _ in range(4)]
                for b in f.result()]
    before = memory.anonymous_kib()
    assert before - trimmer.after > 64 * 1024  # 48 pieces kept, 48 freed between them resident
    assert await trimmer.once()
    handed_back = before - memory.anonymous_kib()
    assert handed_back > 16 * 1024, f"only {handed_back} KiB handed back"  # of ~48 MiB freed
    assert not await trimmer.once()  # nothing grew since
    assert len(kept) == 48
