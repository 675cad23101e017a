"""naiad under test: the scheduler beside the registry in the origin namespace, one peer per peer
namespace, and one curl per peer pulling the blob through its own peer's mirror port.

Every trial starts a fresh scheduler and fresh peers (empty stores), waits until every peer is
healthy and registered, then pulls. After the pull it keeps, in the trial's log directory, each
peer's counters (bytes by source, uploads), the scheduler's stats and the task's piece map; with
`trace`, also the piece map sampled every half second during the pull; with `py_spy`, a
py-spy profile (collapsed stacks, idle included, so the share of samples in `select` is the
event loop's idle time) of every naiad process during the pull.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.swarm.clients import Trial, measure_pull
from bench.swarm.report import Result
from bench.swarm.topology import Host, Lab

SCHEDULER_PORT = 8002
MIRROR_PORT = 65001
UPLOAD_PORT = 65002
_METRICS = ("naiad_peer_download_bytes_total", "naiad_peer_upload_bytes_total",
            "naiad_peer_served_bytes_total", "naiad_peer_verify_failures_total",
            "naiad_peer_piece_seconds_sum", "naiad_peer_piece_seconds_count")


@dataclass
class NaiadOptions:
    python: str = sys.executable
    # Run naiad from this source tree (PYTHONPATH and working directory), not the installed one.
    src: Path | None = None
    peer_args: list[str] = field(default_factory=list)
    scheduler_args: list[str] = field(default_factory=list)
    trace: bool = False
    py_spy: bool = False


def _metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(_METRICS):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def _trace(lab: Lab, url: str, sink: list[dict[str, Any]], started: float,
                 operator: dict[str, str]) -> None:
    """Sample the piece map: how many pieces each peer holds, and the live leases."""
    while True:
        try:
            task = json.loads(await lab.http_get(lab.origin, url, operator))
            held: dict[str, int] = {}
            for piece in task.get("piece_map", []):
                for h in piece["holders"]:
                    held[h] = held.get(h, 0) + 1
            sink.append({"t": round(time.perf_counter() - started, 2), "held": held,
                         "leases": task.get("leases", [])})
        except (RuntimeError, ValueError):
            pass
        await asyncio.sleep(0.5)


async def _holdings(lab: Lab, url: str, operator: dict[str, str]) -> dict[str, int]:
    """Pieces each peer holds, from the scheduler's piece map."""
    task = json.loads(await lab.http_get(lab.origin, url, operator))
    held = dict.fromkeys((h.name for h in lab.peers), 0)
    for piece in task.get("piece_map", []):
        for h in piece["holders"]:
            held[h] = held.get(h, 0) + 1
    return held


async def run(trial: Trial, opts: NaiadOptions) -> Result:
    lab = trial.lab
    origin = lab.origin
    secret = secrets.token_hex(16)
    # The scheduler listens beyond loopback, so it needs an operator token; the token also
    # shows the piece map (chunk ids and holders) that unsigned callers do not see.
    token = secrets.token_hex(16)
    operator = {"Authorization": f"Bearer {token}"}
    sched_url = f"http://{origin.ip}:{SCHEDULER_PORT}"
    env = {"PYTHONPATH": str(opts.src)} if opts.src else {}
    logs = trial.logdir / "naiad"
    procs: list[asyncio.subprocess.Process] = []
    try:
        sched = await lab.spawn(origin, [
            opts.python, "-m", "naiad", "scheduler", "--listen", f"{origin.ip}:{SCHEDULER_PORT}",
            "--udp", f"{origin.ip}:{SCHEDULER_PORT + 1}", "--cluster-secret", secret,
            "--token", token, *opts.scheduler_args], logs / "scheduler.log",
            env=env, cwd=opts.src)
        procs.append(sched)
        await lab.wait_http(origin, f"{sched_url}/healthy", proc=sched)
        peers: dict[Host, asyncio.subprocess.Process] = {}
        for host in lab.peers:
            peers[host] = await lab.spawn(host, [
                opts.python, "-m", "naiad", "peer", "--id", host.name, "--scheduler", sched_url,
                "--listen", f"{host.ip}:{MIRROR_PORT}", "--upload", f"{host.ip}:{UPLOAD_PORT}",
                "--data-dir", str(trial.workdir / "stores" / host.name),
                "--registry", trial.registry_url, "--cluster-secret", secret, *opts.peer_args],
                logs / f"{host.name}.log", env=env, cwd=opts.src)
            procs.append(peers[host])
        await asyncio.gather(*(lab.wait_http(h, f"http://{h.ip}:{MIRROR_PORT}/healthy", proc=p)
                               for h, p in peers.items()))
        await _registered(lab, sched_url, {h.name for h in lab.peers}, operator)
        await asyncio.sleep(1.0)  # let start-up settle (first heartbeats, imports done)

        task_url = f"{sched_url}/api/v1/tasks/{trial.blob.digest}"
        timeline: list[dict[str, Any]] = []
        tracer = (asyncio.create_task(
            _trace(lab, task_url, timeline, time.perf_counter(), operator))
            if opts.trace else None)
        pids = {"scheduler": sched.pid, **{h.name: p.pid for h, p in peers.items()}}
        urls = {h: f"http://{h.ip}:{MIRROR_PORT}{trial.blob.url_path}" for h in lab.peers}
        spies = await _py_spy(pids, logs) if opts.py_spy else []
        try:
            result = await measure_pull(trial, "naiad", urls, pids,
                                        partial(_holdings, lab, task_url, operator))
        finally:
            if tracer is not None:
                tracer.cancel()
            for spy in spies:  # py-spy writes its file on SIGINT
                spy.send_signal(signal.SIGINT)
            await asyncio.gather(*(spy.wait() for spy in spies))
        await asyncio.sleep(0.5)  # the last announcements and counters reach the scheduler
        result.notes.update(await _diagnostics(lab, sched_url, task_url, logs, operator))
        if timeline:
            (logs / "timeline.json").write_text(json.dumps(timeline))
        return result
    finally:
        await asyncio.gather(*(lab.stop(p) for p in procs[1:]))
        if procs:
            await lab.stop(procs[0])


async def _py_spy(pids: dict[str, int], logs: Path) -> list[asyncio.subprocess.Process]:
    """Start sampling each process (from the root namespace: py-spy needs only the pid)."""
    spies = [await asyncio.create_subprocess_exec(
        "py-spy", "record", "--pid", str(pid), "--nonblocking", "--idle", "--rate", "100",
        "--format", "raw", "--output", str(logs / f"py-spy-{name}.txt"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for name, pid in pids.items()]
    await asyncio.sleep(1.0)  # attached
    return spies


async def _registered(lab: Lab, sched_url: str, ids: set[str], operator: dict[str, str],
                      seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            listed = json.loads(await lab.http_get(lab.origin, f"{sched_url}/api/v1/peers",
                                                   operator))
            if ids <= {p["id"] for p in listed["peers"]}:
                return
        except (RuntimeError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"peers not all registered after {seconds} s")
        await asyncio.sleep(0.2)


async def _diagnostics(lab: Lab, sched_url: str, task_url: str, logs: Path,
                       operator: dict[str, str]) -> dict[str, Any]:
    """Per-peer counters, scheduler stats and the piece map (raw in `logs`, a summary back)."""
    peers: dict[str, dict[str, float]] = {}
    for host in lab.peers:
        try:
            text = await lab.http_get(host, f"http://{host.ip}:{MIRROR_PORT}/metrics")
            peers[host.name] = _metrics(text.decode())
        except RuntimeError:
            peers[host.name] = {}
    summary: dict[str, Any] = {"peer_metrics": peers}
    for name, url in (("stats", f"{sched_url}/api/v1/stats"), ("task", task_url),
                      ("peers", f"{sched_url}/api/v1/peers")):
        try:
            data = json.loads(await lab.http_get(lab.origin, url, operator))
        except (RuntimeError, ValueError):
            continue
        (logs / f"{name}.json").write_text(json.dumps(data, indent=1))
        if name == "stats":
            summary["scheduler_stats"] = data
        elif name == "peers":  # who was reported (slow, failed, corrupt) and penalised
            summary["penalties"] = {p["id"]: p.get("penalty_reason") for p in data["peers"]
                                    if p.get("penalty_reason")}
    (logs / "peer_metrics.json").write_text(json.dumps(peers, indent=1))
    return summary
