"""What the loopback benchmarks share: a fresh per-user config for the daemons they start, a
random blob pushed into the registry without holding it in memory, `curl` as the client (timed,
its byte count checked, or its output hashed), CPU time per process and per thread and RSS
from /proc, and the machine and commit a result was measured on."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.swarm.registry import make_blob

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def fresh_config() -> Path:
    """Point XDG_CONFIG_HOME at a new empty directory, as the tests' autouse fixture does: the
    cluster secret the daemons generate lands there, never in the real home."""
    config = Path(tempfile.mkdtemp(prefix="naiad-bench-config-"))
    os.environ["XDG_CONFIG_HOME"] = str(config)
    for name in ("NAIAD_CLUSTER_SECRET", "NAIAD_CLUSTER_SECRET_FILE", "NAIAD_INSECURE"):
        os.environ.pop(name, None)
    return config


def commit() -> str:
    """The naiad commit measured: NAIAD_COMMIT when run from an export (`git archive`), else
    the tree's HEAD, marked `+dirty` when the tree has uncommitted changes."""
    if named := os.environ.get("NAIAD_COMMIT"):
        return named
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, object]:
    return {"node": platform.node(), "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


async def push_file(registry_url: str, repo: str, path: Path, digest: str) -> None:
    """Push a file as one monolithic blob upload, streamed from disk."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{registry_url}/v2/{repo}/blobs/uploads/") as r:
            location = r.headers["Location"]
        if location.startswith("/"):
            location = registry_url + location
        sep = "&" if "?" in location else "?"

        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:
                while part := f.read(8 * MiB):
                    yield part

        async with s.put(f"{location}{sep}digest={digest}", data=chunks(),
                         headers={"Content-Type": "application/octet-stream",
                                  "Content-Length": str(path.stat().st_size)}) as r:
            assert r.status == 201, await r.text()


async def push_random(registry_url: str, repo: str, size: int, scratch: Path) -> str:
    """A fresh random blob of `size` bytes in the registry; its digest."""
    path = scratch / "blob.bin"
    digest, _ = await asyncio.to_thread(make_blob, path, size)
    try:
        await push_file(registry_url, repo, path, digest)
    finally:
        path.unlink()
    return digest


@dataclass(frozen=True)
class Fetched:
    seconds: float
    size: int  # bytes curl received (its size_download)


async def curl(url: str, out: str | Path = "/dev/null",
               headers: dict[str, str] | None = None) -> Fetched:
    """One GET by the real curl binary; fails on an HTTP error or a body cut short."""
    args = ["curl", "-sSf", "-o", str(out), "-w", "%{size_download}"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*args, url, stdout=asyncio.subprocess.PIPE)
    written, _ = await proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"curl {url} failed with {proc.returncode}")
    return Fetched(seconds, int(written))


async def curl_seconds(url: str, headers: dict[str, str] | None = None) -> float:
    return (await curl(url, headers=headers)).seconds


async def sha256_of_file(path: Path) -> str:
    proc = await asyncio.create_subprocess_exec("sha256sum", str(path),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"sha256sum {path} failed")
    return "sha256:" + out.split()[0].decode()


async def curl_sha256(url: str) -> str:
    """The sha256 digest of the body curl receives, hashed by sha256sum through a pipe."""
    r, w = os.pipe()
    try:
        fetch = await asyncio.create_subprocess_exec("curl", "-sSf", url, stdout=w)
        hasher = await asyncio.create_subprocess_exec("sha256sum", stdin=r,
                                                      stdout=asyncio.subprocess.PIPE)
    finally:
        os.close(r)
        os.close(w)
    out, _ = await hasher.communicate()
    if await fetch.wait() or hasher.returncode:
        raise RuntimeError(f"curl {url} | sha256sum failed")
    return "sha256:" + out.split()[0].decode()


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks a process has used (all its threads)."""
    return _ticks(Path(f"/proc/{pid}/stat"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads)."""
    return cpu_ticks(pid) / TICK


def thread_ticks(pid: int) -> dict[str, int]:
    """User + system clock ticks per thread, keyed `name/tid`: the event loop's thread is the
    one named like the process, worker threads (`asyncio_N`) are the hashing and file writes."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            out[f"{name}/{task.name}"] = _ticks(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we looked
    return out


def user_system_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process has used (all its threads), apart."""
    fields = stat_fields(Path(f"/proc/{pid}/stat").read_text())
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def thread_ns(pid: int) -> dict[int, int]:
    """Nanoseconds each live thread of a process has run on a CPU, by thread id (schedstat:
    finer than the 10 ms ticks of /proc/PID/stat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we looked
    return out


def cpu_ns(pid: int) -> int:
    """Nanoseconds all of a process's live threads have run on a CPU (schedstat)."""
    return sum(thread_ns(pid).values())


def rss_kib(pid: int) -> int:
    """A process's resident set now, KiB (ProcessLookupError once it has exited)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProcessLookupError(pid)


def stat_fields(text: str) -> list[str]:
    """The fields of a /proc/…/stat line after the command name (which may hold spaces and
    parentheses): index 11 is utime, 12 stime."""
    return text.rsplit(")", 1)[1].split()


def _ticks(stat: Path) -> int:
    fields = stat_fields(stat.read_text())
    return int(fields[11]) + int(fields[12])  # utime + stime


TICK = os.sysconf("SC_CLK_TCK")


async def quiet(pids: Iterable[int], seconds: float = 10.0) -> None:
    """Until these processes used at most one tick over 0.2 s (a peer's seal, confirmation and
    announcements after a pull done), so the next measure does not share the CPU with them;
    dirty pages written back first (`sync`), so the next does not pay for the last one's."""
    pids = list(pids)
    await asyncio.to_thread(os.sync)
    deadline = time.monotonic() + seconds
    last = sum(cpu_ticks(p) for p in pids)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = sum(cpu_ticks(p) for p in pids)
        if now - last <= 1:
            return
        last = now
