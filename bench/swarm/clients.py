"""curl clients, one per peer namespace, started together; and the sha256 check of copies.

Every client is spawned first and blocks on a line of stdin; the clock starts when the lab
writes "go" to all of them, so process start-up (`ip netns exec`, curl's own) is not timed. The
BitTorrent leechers are started the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

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


_WAIT_THEN_CURL = 'read _ && exec curl -sS -f --max-time "$3" -D "$1.headers" -o "$1" "$2"'


async def go(procs: list[asyncio.subprocess.Process]) -> float:
    """Release every waiting process at once; the start time."""
    started = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
    await asyncio.gather(*(p.stdin.drain() for p in procs if p.stdin is not None))
    return started


async def pull_all(lab: Lab, urls: dict[Host, str], outdir: Path, logdir: Path,
                   max_seconds: float) -> tuple[list[float], list[str]]:
    """Each host's client GETs its URL at the same moment (into `outdir`, which must exist).
    Returns each client's finish time (seconds since the start) and the errors of the clients
    that failed."""
    procs = [await lab.spawn(host, ["sh", "-c", _WAIT_THEN_CURL, "client",
                                    str(outdir / f"{host.name}.bin"), url,
                                    str(int(max_seconds))],
                             logdir / f"curl-{host.name}.log", pipes=True)
             for host, url in urls.items()]
    started = await go(procs)

    async def finish(p: asyncio.subprocess.Process) -> float:
        await p.wait()
        return time.perf_counter() - started

    times = list(await asyncio.gather(*(finish(p) for p in procs)))
    errors = [f"{host.name}: curl exit {p.returncode}"
              for host, p in zip(urls, procs, strict=True) if p.returncode]
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
                       pids: dict[str, int] | None = None) -> Result:
    """Pull through `urls` at once; time it, count the origin's egress, check every copy."""
    lab = trial.lab
    outdir = trial.workdir  # created by the lab, emptied after the trial
    cpu = CpuSampler(pids)
    before = lab.tx_bytes(lab.origin)
    cpu.start()
    times, errors = await pull_all(lab, urls, outdir, trial.logdir / system, trial.timeout)
    usage = cpu.stop()
    origin_tx = lab.tx_bytes(lab.origin) - before
    headers = {host.name: _naiad_headers(outdir / f"{host.name}.bin.headers") for host in urls}
    ok = sha256_ok([outdir / f"{host.name}.bin" for host in urls], trial.blob.digest)
    return Result(system=system, run=trial.run, seconds=None if errors else max(times),
                  origin_tx=origin_tx, size=trial.blob.size, sha_ok=ok and not errors,
                  clients=times, cpu=usage,
                  notes={"headers": headers} if any(headers.values()) else {},
                  error="; ".join(errors) or None)
