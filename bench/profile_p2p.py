"""Profile the cold and the peer-to-peer paths (issue 12). Each run pushes a fresh random blob
to a real docker-registry and starts fresh peers A and B: A pulls the blob cold from the
registry (`cold`), then B pulls it from A (`p2p`), each to `curl -o /dev/null`, and every copy
is checked against the digest afterwards. Per pull it prints the rate and the CPU (user +
system, from /proc) that each process spent per MiB — the peers per thread: the event loop's
thread, and the worker threads that hash and write files — and curl's.

With --py-spy DIR, the first run's pulls are recorded by py-spy at 200 Hz, the receiving peer
(A for cold, B for p2p) and the sending one (A for p2p): DIR/cold-a.txt, DIR/p2p-b.txt,
DIR/p2p-a.txt (raw: `stack count` lines) or .json (--format speedscope). --mode gil records
only the thread holding the GIL (`--gil --idle`: where the interpreter's time goes); --mode
threads records every running thread with its id and native frames (`--threads --native`:
what the worker threads spend outside the GIL). Raw profiles are summarised by category.

    python bench/profile_p2p.py --size 512 --runs 1 --py-spy /tmp/prof [--mode threads]
    python bench/profile_p2p.py --summarise /tmp/prof/p2p-b.txt
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loopback import (
    TICK,
    MiB,
    cpu_ticks,
    curl,
    curl_sha256,
    fresh_config,
    push_random,
    quiet,
    thread_ticks,
)
from tests.cluster import Cluster, Node, Registry

PEER_ARGS = ("--scrub-rate", "0")
SPY_FLAGS = {"gil": ("--gil", "--idle"), "threads": ("--threads", "--native")}

# Where a sample's time goes. A thread blocked on a lock, a condition (the GIL, an idle worker's
# queue) or epoll is waiting, not working: py-spy counts it as running in --threads mode.
# Then the naiad concerns, by any frame of the stack (a scheduler call's aiohttp frames are
# the scheduler call's cost); then, for the rest, the mechanism, by the frame nearest the leaf
# that names one. Frames are `qualified.name (file:line)`, native ones `name (lib)`.
WAITING = r"PyThread_acquire_lock|pthread_cond_(timed)?wait|epoll_wait|sem_(timed|clock)?wait|" \
          r"futex|take_gil"
CONCERNS = (
    ("blake3 (chunk ids)", r"chunk_id \(common/ids\.py|blake3"),
    ("sha256 (whole blob)", r"_Sha256|_sha256_of|SHA256|sha256_block"),
    ("zstd (wire: pack or not, per chunk)", r"peer/wire\.py|ZSTD|UploadServer\._pack"),
    ("sqlite index", r"sqlite|pysqlite"),
    ("chunk file create/write/rename", r"ChunkStore\._write_chunk|ChunkStore\._stamp|"
                                       r"write_sidecar"),
    ("chunk file read", r"ChunkStore\._read_verified|ChunkStore\.read_chunk|"
                        r"Path\.read_bytes"),
    ("announcements", r"peer/sched_outbox\.py"),
    ("scheduler calls", r"peer/sched_transport\.py|peer/scheduler_client\.py|"
                        r"peer/sched_session\.py|peer/sched_heartbeats\.py|DecisionBatcher"),
    # Not the middleware's own frame: every signed request's handler runs beneath it.
    ("request signing", r"^(sign|check|verify|_mac|new_nonce|NonceCache\.\w+|Verifier\.\w+) "
                        r"\(common/auth\.py"),
)
# The store's index statements run inside these (sqlite's own frames are native: only seen with
# --native); as the innermost Python frame they are the index's cost.
INDEX_LEAF = r"^ChunkStore\.(put_piece|indexed|put_task|pieces|piece_count|mark_sealed|touch|" \
             r"task|_tx) "
MECHANISMS = (
    ("kernel: socket send/recv, sendfile", r"^(sock_send|sock_recv|send|recv|sendfile|__send|"
                                           r"__recv|writev|readv)|os_sendfile|_sock_sendfile"),
    ("copies (joining, slicing bytes)", r"_read_at_most|memmove|memcpy|bytes_join|"
                                        r"_PyBytes_Join"),
    ("aiohttp client request/response", r"aiohttp/(client|connector|client_reqrep|"
                                        r"client_proto)"),
    ("aiohttp server/protocol/streams", r"aiohttp/|_http_parser|llhttp|multidict|yarl"),
    ("upload server (naiad)", r"peer/upload\.py|common/web\.py"),
    ("origin client (naiad)", r"peer/origin\.py"),
    ("mirror, engine, store (naiad, other)", r"peer/|common/"),
    ("event loop", r"asyncio/|selectors|_asynciomodule|select_epoll|epoll"),
    ("thread pool glue", r"concurrent/futures|threading\.py|_queue"),
)
_PYTHON = re.compile(r"\.py:\d+\)$|\(<frozen ")


def category(frames: list[str]) -> str:
    """The category of one sample, its frames root first (py-spy's raw order)."""
    plain = [f for f in frames if not f.startswith(("thread (", "process "))]
    for f in reversed(plain):  # the native frames below the innermost Python one
        if _PYTHON.search(f):
            break
        if re.search(WAITING, f):
            return WAIT
    for name, pattern in CONCERNS:
        if any(re.search(pattern, f) for f in plain):
            return name
    python = [f for f in plain if _PYTHON.search(f)]
    if python and re.search(INDEX_LEAF, python[-1]):
        return "sqlite index"
    for f in reversed(plain):
        for name, pattern in MECHANISMS:
            if re.search(pattern, f):
                return name
    return "other"


WAIT = "(waiting: GIL, lock, epoll)"


def summarise(raw: Path) -> dict[str, Counter[str]]:
    """Samples per category for each group of threads: `loop` (the main thread, which runs the
    event loop) and `workers`, when recorded with --threads; else `all`."""
    groups: dict[str, Counter[str]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith("thread (") else None
        group = "all" if thread is None else "loop" if thread.endswith("MainThread") \
            else "workers"
        groups.setdefault(group, Counter())[category(frames)] += int(count)
    return groups


def print_summary(raw: Path, cpu: dict[str, float] | None = None) -> None:
    """Each category's share of the working samples of each thread group; with the CPU per MiB
    that group spent over the same pull (from /proc), that share of it in ms per MiB."""
    groups = summarise(raw)
    cpu = cpu or {}
    names = sorted(groups)
    scaled: dict[str, dict[str, float]] = {}
    print(f"{raw.name}:")
    for g in names:
        waiting = groups[g].pop(WAIT, 0)
        working = sum(groups[g].values()) or 1
        ms = f", {cpu[g]:.2f} ms CPU per MiB" if g in cpu else ""
        print(f"  {g}: {working} working samples, {waiting} waiting{ms}")
        scaled[g] = {c: 100 * n / working * (cpu[g] / 100 if g in cpu else 1)
                     for c, n in groups[g].items()}
    unit = "ms/MiB" if all(g in cpu for g in names) else "%"
    print("  " + "".join(f"{g + ' ' + unit:>16}" for g in names) + "  category")
    order = Counter()
    for g in names:
        order.update(scaled[g])
    for c, _ in order.most_common():
        print("  " + "".join(f"{scaled[g].get(c, 0):16.2f}" for g in names) + f"  {c}")


@dataclass
class Watched:
    """The processes whose CPU a pull is charged with."""

    nodes: dict[str, Node]

    def snapshot(self) -> dict[str, int]:
        out = {name: cpu_ticks(n.proc.popen.pid) for name, n in self.nodes.items()}
        for name in ("a", "b"):
            if name in self.nodes:
                pid = self.nodes[name].proc.popen.pid
                loop = next(ticks for thread, ticks in thread_ticks(pid).items()
                            if int(thread.rsplit("/", 1)[1]) == pid)
                # The rest of the process's: a worker thread that ended meanwhile (the store's
                # writer, idle for WRITER_IDLE) leaves /proc/PID/task but not the process total.
                out[f"{name} loop"], out[f"{name} workers"] = loop, out[name] - loop
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # curl, once reaped
        out["curl"] = round((kids.ru_utime + kids.ru_stime) * TICK)
        return out


def spy_binary() -> str:
    beside = Path(sys.executable).parent / "py-spy"  # installed in the venv
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return found


async def spy(pid: int, out: Path, fmt: str, mode: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        spy_binary(), "record", *SPY_FLAGS[mode], "-r", "200", "-f", fmt, "-o", str(out),
        "-p", str(pid), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    await asyncio.sleep(1)  # py-spy has no readiness signal; it attaches within this
    if proc.returncode is not None:
        raise RuntimeError(f"py-spy failed: {(await proc.stderr.read()).decode()}")
    return proc


async def pull(label: str, url: str, size: int, watched: Watched,
               spies: list[asyncio.subprocess.Process]) -> dict[str, float]:
    """One timed curl of `url`; the CPU ms per MiB each watched process (and thread group)
    spent meanwhile."""
    await quiet(n.proc.popen.pid for n in watched.nodes.values())
    before = watched.snapshot()
    got = await curl(url)
    after = watched.snapshot()
    for s in spies:
        s.send_signal(signal.SIGINT)
        await s.wait()
    if got.size != size:
        raise RuntimeError(f"{label}: {got.size} bytes of {size}")
    mib = size / MiB
    cpu = {k: 1000 * (after[k] - before.get(k, 0)) / TICK / mib for k in after}
    print(f"{label}: {size / got.seconds / 1e6:,.0f} MB/s; CPU ms per MiB: "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    return cpu


async def run(size: int, runs: int, spy_dir: Path | None, fmt: str, mode: str) -> None:
    with tempfile.TemporaryDirectory(prefix="naiad-profile-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        try:
            await registry.ready()
            for k in range(runs):
                await one_run(work / f"run{k}", registry, size, k,
                              spy_dir if k == 0 else None, fmt, mode)
        finally:
            registry.stop()


async def one_run(work: Path, registry: Registry, size: int, k: int, spy_dir: Path | None,
                  fmt: str, mode: str) -> None:
    work.mkdir()
    repo = f"bench/profile{k}"
    digest = await push_random(registry.url, repo, size, work)
    path = f"/v2/{repo}/blobs/{digest}"
    cluster = Cluster(work)
    try:
        sched = await cluster.scheduler()
        a, b = await asyncio.gather(cluster.peer("a", sched.url, registry.url, *PEER_ARGS),
                                    cluster.peer("b", sched.url, registry.url, *PEER_ARGS))
        watched = Watched({"a": a, "b": b, "scheduler": sched,
                           "registry": Node("registry", registry.proc, registry.url)})
        ext = "txt" if fmt == "raw" else "json"

        async def spies(*who: Node, label: str) -> list[asyncio.subprocess.Process]:
            if spy_dir is None:
                return []
            return [await spy(n.proc.popen.pid, spy_dir / f"{label}-{n.name}.{ext}", fmt, mode)
                    for n in who]

        cold = await pull(f"run {k + 1} cold (registry → A)", a.url + path, size, watched,
                          await spies(a, label="cold"))
        p2p = await pull(f"run {k + 1} p2p (A → B)", b.url + path, size, watched,
                         await spies(b, a, label="p2p"))
        for node in (a, b):
            if await curl_sha256(node.url + path) != digest:
                raise RuntimeError(f"{node.name}'s copy does not match {digest}")
    finally:
        cluster.stop()
        # Free the run's stores before the next run, as bench/dataplane.py does. Kept, each run's
        # new page cache comes from memory the Firecracker host took back (free page reporting):
        # its first touch cost B's workers 2.7-3.1 ms/MiB more in write()'s copy, runs 2 and 3.
        shutil.rmtree(work, ignore_errors=True)
    if spy_dir is not None and fmt == "raw":
        for label, node, cpu in (("cold", "a", cold), ("p2p", "b", p2p), ("p2p", "a", p2p)):
            print_summary(spy_dir / f"{label}-{node}.txt",
                          {"all": cpu[node], "loop": cpu[f"{node} loop"],
                           "workers": cpu[f"{node} workers"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="blob size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--py-spy", metavar="DIR", type=Path,
                        help="record the first run's pulls with py-spy into DIR")
    parser.add_argument("--format", choices=("raw", "speedscope"), default="raw")
    parser.add_argument("--mode", choices=tuple(SPY_FLAGS), default="gil")
    parser.add_argument("--summarise", metavar="RAW", type=Path, nargs="+",
                        help="only summarise raw py-spy profiles by category")
    parser.add_argument("--cpu", metavar="MS", type=float, nargs="+",
                        help="with --summarise: CPU ms per MiB to scale by: the process's "
                             "(a --mode gil profile), or its loop's and its workers'")
    args = parser.parse_args()
    if args.summarise:
        for raw in args.summarise:
            cpu = dict(zip(("all",) if len(args.cpu or ()) == 1 else ("loop", "workers"),
                           args.cpu or (), strict=False))
            print_summary(raw, cpu)
        return
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    config = fresh_config()
    try:
        asyncio.run(run(args.size * MiB, args.runs, args.py_spy, args.format, args.mode))
    finally:
        shutil.rmtree(config, ignore_errors=True)


if __name__ == "__main__":
    main()
