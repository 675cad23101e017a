"""bench/sampler.py: the in-process profiler the benchmarks' profiles come from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.sampler import top

ROOT = Path(__file__).resolve().parent.parent
SPIN = """
import sys, time

def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

spin(float(sys.argv[1]))
"""


def _shares(out: Path) -> dict[str, tuple[float, float]]:
    with open(out) as f:
        return {name.split(" (")[0]: (own, inclusive) for name, own, inclusive in top(f, 10)}


def test_a_command_run_under_the_sampler_shows_where_its_cpu_went(tmp_path: Path) -> None:
    script = tmp_path / "spin.py"
    script.write_text(SPIN)
    out = tmp_path / "folded"
    done = subprocess.run([sys.executable, "-m", "bench.sampler", "--rate", "500", str(out),
                           str(script), "0.4"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shares = _shares(out)
    assert shares["spin"][0] > 0.8, shares  # nearly every sample inside the loop
    printed = subprocess.run([sys.executable, "-m", "bench.sampler", "--top", "3", str(out)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "spin" in printed.splitlines()[0], printed


def test_a_started_process_samples_itself_from_the_environment(tmp_path: Path) -> None:
    """What a benchmark's spawned scheduler does: sitecustomize, NAIAD_SAMPLE, a matching word."""
    script = tmp_path / "spin.py"
    script.write_text(SPIN)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench' / 'sampler_site'}:{ROOT}",
           "NAIAD_SAMPLE": str(tmp_path / "prof"), "NAIAD_SAMPLE_RATE": "500"}
    matching = subprocess.run([sys.executable, str(script), "0.4", "naiad"], env=env,
                              capture_output=True, text=True)
    assert matching.returncode == 0, matching.stderr
    profile = tmp_path / f"prof.{_pid_of(tmp_path)}"
    assert _shares(profile)["spin"][0] > 0.8
    other = subprocess.run([sys.executable, str(script), "0.05"], env=env,
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert len(list(tmp_path.glob("prof.*"))) == 1, "a process not matching was sampled"


def _pid_of(directory: Path) -> str:
    (only,) = directory.glob("prof.*")
    return only.name.split(".", 1)[1]
