"""`python -m bench.sim --scenario NAME`: see bench/sim/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys

from bench.sim.scenarios import SCENARIOS, run, scaled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__)
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--hosts", type=int, help="this many hosts instead of the scenario's")
    ap.add_argument("--scale", type=float,
                    help="hosts and blob size times this (e.g. 0.01 for a quick look)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--piece-size", type=int, help="MiB, instead of the scenario's")
    args = ap.parse_args(argv)
    if argv is None and os.environ.get("PYTHONHASHSEED") != "0":
        # The scheduler iterates sets of peer ids: the same seed gives the same run only
        # under the same string hashing.
        os.execve(sys.executable, [sys.executable, "-m", "bench.sim", *sys.argv[1:]],
                  {**os.environ, "PYTHONHASHSEED": "0"})
    sc = scaled(SCENARIOS[args.scenario](), args.hosts, args.scale)
    if args.piece_size:
        sc.params.piece_size = args.piece_size << 20
    result = run(sc, args.seed)
    print("\n".join(result.lines()))
    return 0 if result.finished == result.survivors else 1


if __name__ == "__main__":
    sys.exit(main())
