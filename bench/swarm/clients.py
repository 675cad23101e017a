"""curl clients, one per peer namespace, started together; and the sha256 check of copies.

Every client is spawned first and blocks on a line of stdin; the clock starts when the lab
writes "go" to all of them, so process start-up (`ip netns exec`, curl's own) is not timed. The
BitTorrent leechers are started the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.swarm.faults import FaultRun
from bench.swarm.registry import Blob
from bench.swarm.report import Result
from bench.swarm.topology import CpuSampler, Host, Lab


@dataclass
class Trial:
    """What one run of one system under test is given."""

    lab: Lab
    blob: Blob
    registry_url: str  # as the peers reach it
    workdir: Path  # scratch (copies, stores), emptied after the trial
    logdir: Path  # kept
    run: int
    timeout: float
    fault: str | None = None  # a name from faults.FAULTS, injected during the pull


_WAIT_THEN_CURL = 'read _ && exec curl -sS -f --max-time "$3" -D "$1.headers" -o "$1" "$2"'


async def go(procs: list[asyncio.subprocess.Process]) -> float:
    """Release every waiting process at once; the start time."""
    started = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
    await asyncio.gather(*(p.stdin.drain() for p in procs if p.stdin is not None))
    return started


class Stalls:
    """The longest time each client went without receiving a byte, from the release until its
    last byte (sans-IO: fed the sizes of the copies as they are sampled, so it is as exact as
    the sampling period)."""

    def __init__(self, names: list[str]) -> None:
        self._size = dict.fromkeys(names, 0)
        self._since = dict.fromkeys(names, 0.0)  # when its size last grew
        self._last = 0.0
        self.worst = dict.fromkeys(names, 0.0)

    def observe(self, t: float, name: str, size: int) -> None:
        t = max(t, self._last)
        self._last = t
        if size > self._size[name]:
            self.worst[name] = max(self.worst[name], t - self._since[name])
            self._size[name] = size
            self._since[name] = t


class Watch:
    """The clients' copies as they grow: the fault's view of progress, and the stalls."""

    def __init__(self, paths: dict[str, Path], size: int) -> None:
        self.paths = paths
        self.total = size * len(paths)
        self.sizes = dict.fromkeys(paths, 0)
        self.stalls = Stalls(list(paths))

    def sample(self, t: float, name: str) -> None:
        try:
            self.sizes[name] = self.paths[name].stat().st_size
        except FileNotFoundError:
            return
        self.stalls.observe(t, name, self.sizes[name])

    def progress(self) -> float:
        return sum(self.sizes.values()) / self.total if self.total else 1.0

    async def held(self) -> dict[str, int]:
        return dict(self.sizes)


SAMPLE_S = 0.1


async def pull_all(lab: Lab, urls: dict[Host, str], outdir: Path, logdir: Path,
                   max_seconds: float, watch: Watch | None = None,
                   fault: FaultRun | None = None) -> tuple[dict[str, float], list[str]]:
    """Each host's client GETs its URL at the same moment (into `outdir/<host>.bin`; `outdir`
    must exist), sampled by `watch` every SAMPLE_S while `fault` runs. Returns the finish time
    (seconds since the start) of each client that counts (not cut off by the fault) and the
    errors of those that failed; a cut-off client is stopped once the others are done."""
    procs = {host.name: await lab.spawn(host, ["sh", "-c", _WAIT_THEN_CURL, "client",
                                               str(outdir / f"{host.name}.bin"), url,
                                               str(int(max_seconds))],
                                        logdir / f"curl-{host.name}.log", pipes=True)
             for host, url in urls.items()}
    if fault is not None:
        await fault.setup(logdir)
    started = await go(list(procs.values()))
    ended: dict[str, float] = {}

    async def finish(name: str) -> None:
        await procs[name].wait()
        ended[name] = time.perf_counter() - started

    waits = {name: asyncio.create_task(finish(name)) for name in procs}
    injecting = asyncio.create_task(fault.run(started)) if fault is not None else None
    cut: set[str] = set()
    try:
        while True:
            cut = fault.cut if fault is not None else set()
            now = time.perf_counter() - started
            for name in procs:
                if watch is not None and name not in cut:
                    watch.sample(ended.get(name, now), name)
            live = [waits[n] for n in procs if n not in ended and n not in cut]
            if not live:
                break
            if injecting is not None and injecting.done():
                injecting.result()  # a fault that failed stops the trial
            await asyncio.wait(live, timeout=SAMPLE_S)
    finally:
        if injecting is not None:
            injecting.cancel()
            await asyncio.gather(injecting, return_exceptions=True)
        if fault is not None:
            await fault.undo()
        await asyncio.gather(*(lab.stop(procs[n], grace=1.0) for n in cut))
        await asyncio.gather(*waits.values(), return_exceptions=True)
    times = {n: t for n, t in ended.items() if n not in cut}
    errors = [f"{n}: curl exit {p.returncode}" for n, p in procs.items()
              if n not in cut and p.returncode]
    return times, errors


def sha256_ok(paths: list[Path], digest: str) -> bool:
    """Every copy exists and hashes to `digest` (the copies are deleted after)."""
    ok = True
    for path in paths:
        try:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            ok &= "sha256:" + h.hexdigest() == digest
        except FileNotFoundError:
            ok = False
        path.unlink(missing_ok=True)
    return ok


def _naiad_headers(path: Path) -> dict[str, str]:
    """The X-Naiad-* response headers a client got (the last response, after any redirect)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.lower().startswith("x-naiad-"):
            found[name.lower()] = value.strip()
    path.unlink()
    return found


async def measure_pull(trial: Trial, system: str, urls: dict[Host, str],
                       pids: dict[str, int] | None = None,
                       holdings: Callable[[], Awaitable[dict[str, int]]] | None = None
                       ) -> Result:
    """Pull through `urls` at once, under the trial's fault if it has one; time it, count the
    origin's egress, check every copy that counts, and keep each client's worst stall.
    `holdings` is the system's own view of who holds most (the clients' bytes otherwise)."""
    lab = trial.lab
    outdir = trial.workdir  # created by the lab, emptied after the trial
    copies = {host.name: outdir / f"{host.name}.bin" for host in urls}
    watch = Watch(copies, trial.blob.size)
    fault = (FaultRun(lab, trial.fault, watch.progress, holdings or watch.held)
             if trial.fault else None)
    cpu = CpuSampler(pids)
    before = lab.tx_bytes(lab.origin)
    cpu.start()
    times, errors = await pull_all(lab, urls, outdir, trial.logdir / system, trial.timeout,
                                   watch, fault)
    usage = cpu.stop()
    origin_tx = lab.tx_bytes(lab.origin) - before
    headers = {host.name: _naiad_headers(outdir / f"{host.name}.bin.headers") for host in urls}
    counted = [name for name in copies if fault is None or name not in fault.cut]
    ok = sha256_ok([copies[name] for name in counted], trial.blob.digest)
    for path in copies.values():  # the cut-off hosts' partial copies
        path.unlink(missing_ok=True)
    stalls = {name: round(watch.stalls.worst[name], 2) for name in counted}
    notes: dict[str, Any] = {"stalls": stalls}
    if any(headers.values()):
        notes["headers"] = headers
    if fault is not None:
        notes.update(fault.notes())
    return Result(system=system, run=trial.run, seconds=None if errors else max(times.values()),
                  origin_tx=origin_tx, size=trial.blob.size, sha_ok=ok and not errors,
                  clients=[times[n] for n in counted if n in times], cpu=usage,
                  stall=max(stalls.values(), default=None), notes=notes,
                  error="; ".join(errors) or None)
