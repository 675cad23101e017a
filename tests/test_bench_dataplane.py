"""bench/dataplane.py end to end at a small size: one run of its four paths against the real
registry, scheduler, peers and curl, and the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = {"cold", "p2p", "warm_verify", "warm_no_verify"}


def test_dataplane_bench_measures_every_path_and_verifies_the_bytes(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "bench/dataplane.py", "--size", "4", "--runs", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())

    assert set(result["paths"]) == PATHS
    for name, r in result["paths"].items():
        for key in ("naiad_MBps", "baseline_MBps", "ratio"):
            assert len(r[key]) == 1 and r[key][0] > 0, (name, key, r[key])
            assert r["median"][key] == r[key][0]
        # The ratio is of times: naiad's over the baseline's, the inverse of the rates'.
        assert abs(r["ratio"][0] * r["naiad_MBps"][0] / r["baseline_MBps"][0] - 1) < 1e-9
    [run] = result["verified"]
    assert set(run["copies"]) == {"registry", "a", "b", "plain"}
    assert set(run["copies"].values()) == {run["digest"]}
    # Two baselines to a file, two to /dev/null, four naiad paths and the untimed fill.
    assert run["received"] == [4 << 20] * 9
    assert result["machine"]["cores"] >= 1 and result["machine"]["kernel"]
    assert result["commit"]
    # The table names every path, with a ratio.
    for name in PATHS:
        assert any(line.startswith(f"| {name}:") and "\N{MULTIPLICATION SIGN}" in line
                   for line in done.stdout.splitlines()), done.stdout
