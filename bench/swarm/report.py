"""What a run measured, the fluid bound it is compared with, and the table."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

SYSTEMS = ("naiad", "direct", "bittorrent")


def fluid_bound(size: int, n: int, origin_bps: float, peer_bps: float,
                download_bps: float = float("inf")) -> float:
    """Seconds to give `n` peers a file of `size` bytes from one origin (Kumar & Ross 2006):
    max(F/u_s, F/min d_i, N·F/(u_s + Σ u_i)). Downloads are unshaped here, so min d_i is the
    bridge's line rate, effectively infinite."""
    bits = size * 8
    return max(bits / origin_bps, bits / download_bps, n * bits / (origin_bps + n * peer_bps))


@dataclass
class Result:
    system: str
    run: int
    seconds: float | None  # until the last client held the whole blob; None: failed
    origin_tx: int  # bytes out of the origin's interface during the pull
    size: int
    sha_ok: bool
    clients: list[float] = field(default_factory=list)  # each client's finish time, s
    cpu: dict[str, Any] = field(default_factory=dict)  # CpuSampler.stop() over the pull
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # Longest time any counted client received no byte (from the release to its last byte).
    stall: float | None = None

    @property
    def egress(self) -> float:
        return self.origin_tx / self.size

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "egress": self.egress}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(results: list[Result], bound: float) -> str:
    """A Markdown table: medians per system over the runs, with each run's values beside."""
    lines = ["| system | time to last copy (median) | time / fluid bound | origin egress "
             "(median) | worst stall (median) | sha256 ok | runs: time s (egress x, stall s) |",
             "|---|---|---|---|---|---|---|",
             f"| fluid bound | {bound:.1f} s | 1.00 | 1.00 x | | | |"]
    for system in SYSTEMS:
        rs = [r for r in results if r.system == system]
        if not rs:
            continue
        ok = [r for r in rs if r.seconds is not None]
        t = _median([r.seconds for r in ok if r.seconds is not None])
        egress = _median([r.egress for r in ok])
        stall = _median([r.stall for r in rs if r.stall is not None])
        runs = ", ".join(f"{r.seconds:.1f} ({r.egress:.2f}, {_fmt(r.stall, '.1f')})"
                         if r.seconds is not None else "failed" for r in rs)
        sha = f"{sum(r.sha_ok for r in rs)}/{len(rs)}"
        lines.append(f"| {system} | {_fmt(t, '.1f', ' s')} | "
                     f"{_fmt(t / bound if t is not None else None, '.2f')} | "
                     f"{_fmt(egress, '.2f', ' x')} | {_fmt(stall, '.1f', ' s')} | {sha} | "
                     f"{runs} |")
    return "\n".join(lines)


def run_line(r: Result, bound: float) -> str:
    if r.seconds is None:
        return f"run {r.run} {r.system:<10} FAILED: {r.error}"
    spread = f"first copy {min(r.clients):.1f} s" if r.clients else ""
    cpu = f"cpu busy {r.cpu.get('busy', 0):.0%} (pressure {r.cpu.get('pressure', 0):.0%})"
    if r.cpu.get("cpu_seconds"):
        cpu += (f", ours {sum(r.cpu['cpu_seconds'].values()):.1f} cpu-s, waited "
                f"{sum(r.cpu['runq_seconds'].values()):.1f} s in the run queue")
    stall = f"worst stall {_fmt(r.stall, '.1f', ' s')}"
    if r.notes.get("cut"):
        stall += f" (cut off, not counted: {' '.join(r.notes['cut'])})"
    return (f"run {r.run} {r.system:<10} {r.seconds:6.1f} s  {r.seconds / bound:5.2f}x bound  "
            f"origin egress {r.egress:5.2f}x  sha {'ok' if r.sha_ok else 'BAD'}  {stall}  "
            f"{spread}  {cpu}")
