"""bench/fleet.py: a small fleet pull against a real scheduler process (memory store), the
shape of its last line and that its figures agree with each other; its pure arithmetic."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fleet import demanded, fleet_line, parse_rate

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"fleet hosts=(\d+) size=(\S+) store=(\S+) demanded=(\d+)/s replica=(\d+)/s "
                  r"shard=(\d+)/s p99=([\d.]+)ms replicas=(\d+) shards=(\d+)")


def test_a_small_fleet_pull_is_measured_and_sized() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--hosts", "40", "--size", "32MiB",
         "--piece-size", "4MiB", "--store", "memory", "--simulate", "4", "--seconds", "30"],
        cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    m = LINE.fullmatch(lines[-1])
    assert m, lines[-1]
    hosts, size, store, demand, replica, shard, p99, replicas, shards = m.groups()
    assert int(shards) == int(replicas)
    assert (hosts, size, store) == ("40", "32MiB", "memory")
    # 40 hosts at 300 MB/s in pieces of 4 MiB.
    assert int(demand) == round(40 * 300e6 / (4 << 20))
    assert int(replica) > 0 and int(shard) == int(replica)  # memory: the state is the replica
    # The printed figures are rounded: the count is theirs to within one.
    assert abs(int(replicas) - math.ceil(int(demand) / int(replica))) <= 1
    assert 0 < float(p99) < 5000
    # Every simulated pull completed: 4 hosts x 8 pieces decided and announced.
    assert "4/4 pulls complete" in done.stdout, done.stdout
    assert "pieces decided 32 " in done.stdout and "announced 32" in done.stdout, done.stdout


def test_the_line_sizes_the_fleet_from_the_rates() -> None:
    demand = demanded(2600, parse_rate("300MB/s"), 4 << 20)
    assert demand == pytest.approx(185_966, rel=1e-4)
    line = fleet_line(2600, "3GiB", "redis", demand, 25_000, 80_000, 12.345)
    assert line == ("fleet hosts=2600 size=3GiB store=redis demanded=185966/s replica=25000/s "
                    "shard=80000/s p99=12.3ms replicas=8 shards=3")
    assert LINE.fullmatch(line)


@pytest.mark.parametrize(("text", "rate"), [("300MB/s", 300e6), ("1GB/s", 1e9),
                                            ("64MiB/s", 64 << 20), ("1000", 1000.0)])
def test_rates_are_read_in_the_units_links_use(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


def test_with_the_spread_share_every_piece_is_still_decided_and_announced_once() -> None:
    """`--spread`: the hosts (300 MB/s: fast enough) draw three quarters of their window
    ahead; each of the 128 pieces is still asked once, decided and announced, and every pull
    completes."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--hosts", "40", "--size", "512MiB",
         "--piece-size", "4MiB", "--store", "memory", "--simulate", "4", "--seconds", "60",
         "--spread"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4/4 pulls complete" in done.stdout, done.stdout
    assert "pieces decided 512 " in done.stdout and "announced 512" in done.stdout, done.stdout
