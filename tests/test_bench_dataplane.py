"""bench/dataplane.py end to end at a small size: one run of its four paths against the real
registry, scheduler, peers and curl, and the JSON it writes; and the CPU arithmetic it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dataplane import CONTENDED, TICK, Cpu, Pair, Snapshot, cpu_between  # noqa: E402

PATHS = {"cold", "p2p", "warm_verify", "warm_no_verify"}
SERVING = {"cold": "a", "p2p": "b", "warm_verify": "a", "warm_no_verify": "plain"}


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "bench/dataplane.py", "--size", "4", "--runs", "1",
                           "--json", str(out), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def test_dataplane_bench_measures_every_path_and_verifies_the_bytes(tmp_path: Path) -> None:
    result, stdout = run_bench(tmp_path, "--cpu")

    assert set(result["paths"]) == PATHS
    for name, r in result["paths"].items():
        for key in ("naiad_MBps", "baseline_MBps", "ratio"):
            assert len(r[key]) == 1 and r[key][0] > 0, (name, key, r[key])
            assert r["median"][key] == r[key][0]
        # The ratio is of times: naiad's over the baseline's, the inverse of the rates'.
        assert abs(r["ratio"][0] * r["naiad_MBps"][0] / r["baseline_MBps"][0] - 1) < 1e-9
        # Every process is accounted on both sides; the serving peer's figure is its own.
        [pair] = [run[name] for run in result["pairs"]]
        for side in ("naiad_cpu", "baseline_cpu"):
            assert set(pair[side]["by_process"]) == {"registry", "scheduler", "curl",
                                                     *SERVING.values()}, pair[side]
        assert pair["cpu_ms_per_MiB"] == pair["naiad_cpu"]["by_process"][SERVING[name]]
        assert r["cpu"]["cores"] == result["machine"]["cores"]
        assert set(r["uncontended_ratio"]) <= set(r["ratio"])
    [run] = result["verified"]
    assert set(run["copies"]) == {"registry", "a", "b", "plain"}
    assert set(run["copies"].values()) == {run["digest"]}
    # Per path a baseline before and after naiad's pull; and the untimed fill.
    assert run["received"] == [4 << 20] * 13
    assert result["machine"]["cores"] >= 1 and result["machine"]["kernel"]
    assert result["commit"] and result["prepare"] == "none" and not result["aa"]
    assert result["aba"]
    # The table names every path, with a ratio; --cpu adds a baseline and a naiad row each.
    for name in PATHS:
        assert any(line.startswith(f"| {name}:") and "\N{MULTIPLICATION SIGN}" in line
                   for line in stdout.splitlines()), stdout
        for side in ("baseline", "naiad"):
            assert any(line.startswith(f"| {name} | {side} |")
                       for line in stdout.splitlines()), stdout


def test_aa_times_a_second_baseline_in_naiads_place(tmp_path: Path) -> None:
    result, _ = run_bench(tmp_path, "--aa", "--aba", "--paths", "cold,warm_verify",
                          "--prepare", "none")

    assert result["aa"] and result["aba"] and result["prepare"] == "none"
    [pair] = result["pairs"]
    for name in ("cold", "warm_verify"):
        # naiad's side was served by the registry: its figure is the registry's.
        assert pair[name]["cpu_ms_per_MiB"] == pair[name]["naiad_cpu"]["by_process"]["registry"]
        # With --aba the ratio is over the mean of the baseline before and after.
        p = pair[name]
        mean = (p["baseline_s"] + p["baseline_after_s"]) / 2
        assert abs(result["paths"][name]["ratio"][0] * mean / p["naiad_s"] - 1) < 1e-9
    [run] = result["verified"]
    assert set(run["copies"].values()) == {run["digest"]}
    # Per path the baseline, the second in naiad's place, naiad's pull untimed, the baseline.
    assert run["received"] == [4 << 20] * 8


def test_cpu_between_counts_every_process_and_names_the_busiest_thread() -> None:
    pids = {"registry": 11, "a": 12}
    before = Snapshot(pids, {"registry": 0, "a": 10}, {"a main": 0, "a thread 7": 0}, 1.0,
                      5.0, (1000, 3), {11: ("docker-registry", 0), 99: ("kworker/0:1-a", 5)})
    after = Snapshot(pids, {"registry": TICK // 10, "a": 10 + TICK // 2},
                     {"a main": 150_000_000, "a thread 7": 350_000_000, "a thread 9": 0}, 1.2,
                     5.1, (1000 + TICK, 3 + TICK // 10),
                     {11: ("docker-registry", TICK // 10), 99: ("kworker/0:1-b", 5 + TICK // 10)})

    cpu = cpu_between(before, after, mib=100)

    # 0.1 s of registry, 0.5 s of peer, 0.2 s of curl, over 100 MiB.
    assert cpu.by_process == pytest.approx({"registry": 1.0, "a": 5.0, "curl": 2.0})
    assert cpu.busiest == "a thread" and cpu.busiest_ms_per_MiB == 3.5
    # Eight ms/MiB over two cores is 4 a MiB; over four, the busiest thread's 3.5 bounds it.
    assert cpu.bound(2) == pytest.approx(4.0) and cpu.bound(4) == 3.5
    # The machine was busy 1 s: 0.8 s of it the pull's, 0.1 s the bench's, 0.1 s someone else's.
    assert cpu.others_ms_per_MiB == pytest.approx(1.0) and cpu.steal_ms_per_MiB == 1.0
    # Named, by pid (a kernel worker's name changes), the pull's own processes left out.
    assert cpu.others_top == [("kworker/0:1-b 99", 1.0)]


def test_a_pair_is_contended_when_other_work_ran_beside_any_of_its_pulls() -> None:
    def cpu(others: float) -> Cpu:
        return Cpu({"registry": 1.0}, "curl", 1.0, others)

    quiet, busy = cpu(0.0), cpu(CONTENDED * 2)
    assert not Pair(1.0, 1.0, 0.0, quiet, quiet).contended
    assert Pair(1.0, 1.0, 0.0, busy, quiet).contended
    assert Pair(1.0, 1.0, 0.0, quiet, busy).contended
    assert Pair(1.0, 1.0, 0.0, quiet, quiet, 1.0, busy).contended  # the baseline after (--aba)
