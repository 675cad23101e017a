"""Baseline (b): BitTorrent (Debian's python3-libtorrent): a seeder holding the blob in the
origin namespace, one leecher per peer namespace, full mesh (each leecher is given the seeder and
every other leecher), no tracker, no DHT/LSD/UPnP/NAT-PMP; TCP only and a v1 torrent unless told
otherwise (see bt_node.py). The clock starts when every leecher,
already set up, is told "go", and stops when the last one holds every piece."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.swarm.clients import Trial, go, sha256_ok
from bench.swarm.report import Result
from bench.swarm.topology import CpuSampler

PYTHON = "/usr/bin/python3"  # Debian's, which has the libtorrent binding
NODE = str(Path(__file__).with_name("bt_node.py"))
PORT = 6881


async def _expect(proc: asyncio.subprocess.Process, word: str, seconds: float) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), seconds)
    if line.strip() != word.encode():
        raise RuntimeError(f"BitTorrent node said {line!r}, expected {word!r} "
                           f"(exit {proc.returncode}; see its log)")


@dataclass
class BtOptions:
    utp: bool = False  # TCP only by default
    hybrid: bool = False  # v1-only torrent by default


async def run(trial: Trial, opts: BtOptions) -> Result:
    lab, blob = trial.lab, trial.blob
    work = trial.workdir / "bt"
    logs = trial.logdir / "bittorrent"
    (work / "seed").mkdir(parents=True, exist_ok=True)
    seed_copy = work / "seed" / "blob"
    os.link(blob.path, seed_copy)
    torrent = work / "blob.torrent"
    flags = ["--utp"] if opts.utp else []
    procs: list[asyncio.subprocess.Process] = []
    try:
        seeder = await lab.spawn(lab.origin, [
            PYTHON, NODE, "seed", "--blob", str(seed_copy), "--torrent", str(torrent),
            "--listen", f"{lab.origin.ip}:{PORT}", *flags, *(["--hybrid"] if opts.hybrid else [])],
            logs / "seeder.log", pipes=True)
        procs.append(seeder)
        await _expect(seeder, "ready", 300)
        everyone = [f"{h.ip}:{PORT}" for h in lab.hosts]
        leechers = []
        for host in lab.peers:
            others = ",".join(a for a in everyone if a != f"{host.ip}:{PORT}")
            leechers.append(await lab.spawn(host, [
                PYTHON, NODE, "leech", "--torrent", str(torrent),
                "--save", str(work / host.name), "--listen", f"{host.ip}:{PORT}",
                "--peers", others, *flags], logs / f"{host.name}.log", pipes=True))
            procs.append(leechers[-1])
        await asyncio.gather(*(_expect(p, "ready", 120) for p in leechers))
        await asyncio.sleep(1.0)

        cpu = CpuSampler({"seeder": seeder.pid,
                          **{h.name: p.pid for h, p in zip(lab.peers, leechers, strict=True)}})
        before = lab.tx_bytes(lab.origin)
        cpu.start()
        started = await go(leechers)

        async def done(p: asyncio.subprocess.Process) -> float:
            await _expect(p, "done", trial.timeout)
            return time.perf_counter() - started

        error = None
        try:
            times = list(await asyncio.gather(*(done(p) for p in leechers)))
        except (TimeoutError, RuntimeError) as e:
            times, error = [], repr(e)
        usage = cpu.stop()
        origin_tx = lab.tx_bytes(lab.origin) - before
    finally:
        for p in procs:  # closing stdin ends a node
            if p.stdin is not None and not p.stdin.is_closing():
                p.stdin.close()
        await asyncio.gather(*(lab.stop_after(p, 5.0) for p in procs))
    ok = sha256_ok([work / h.name / "blob" for h in lab.peers], blob.digest)
    return Result(system="bittorrent", run=trial.run, seconds=max(times) if times else None,
                  origin_tx=origin_tx, size=blob.size, sha_ok=ok and not error,
                  clients=times, cpu=usage, error=error)
