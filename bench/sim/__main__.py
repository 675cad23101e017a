"""`python -m bench.sim --scenario NAME`: see bench/sim/__init__.py."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from bench.sim import experiments
from bench.sim.scenarios import SCENARIOS, run, scaled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__)
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--hosts", type=int, help="this many hosts instead of the scenario's")
    ap.add_argument("--scale", type=float,
                    help="hosts and blob size times this (e.g. 0.01 for a quick look)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=float, help="blob size in MiB, instead of the scenario's")
    ap.add_argument("--piece-size", type=int, help="MiB, instead of the scenario's")
    ap.add_argument("--wave", type=float, help="pulls start spread over this many seconds")
    ap.add_argument("--die", type=float, help="fraction of hosts that die (at --die-at)")
    ap.add_argument("--die-at", type=float, help="when hosts die, in fluid bounds")
    ap.add_argument("--slow", type=float, help="fraction of hosts with a slow uplink (1/20)")
    ap.add_argument("--corrupt", type=float, help="fraction of hosts serving corrupt bytes")
    ap.add_argument("--restart-at", type=float,
                    help="the scheduler restarts (2 s away, state lost) this many bounds in")
    ap.add_argument("--wake-limit", type=int,
                    help="experiment: an announcement wakes this many parked calls per piece "
                         "(0: all of them; default: as many as the piece has room for, "
                         "ClusterState.room, as the memory store wakes)")
    ap.add_argument("--readahead", type=int,
                    help="experiment: the reader's window in MiB (default: reader.py's)")
    ap.add_argument("--children", type=int,
                    help="experiment: scheduler.state.CHILDREN_PER_HOLDER set to this in this "
                         "process (a rule change tried without editing the rules)")
    ap.add_argument("--sched-cores", type=int,
                    help="experiment: the scheduler as this many cores, each call's work "
                         "queued for one and holding it for what it cost here, so answers "
                         "leave late (bench/sim/cost.py; the run then depends on this "
                         "machine's speed)")
    ap.add_argument("--edge-us", metavar="CALL[,PIECE]",
                    help="the scheduler edge's CPU price per call and per piece in it, us "
                         "(default: bench/sim/cost.py's; 0 prices only the rules)")
    ap.add_argument("--experiment", action="append", default=[],
                    choices=sorted(experiments.EXPERIMENTS),
                    help="a rule change tried in this process (bench/sim/experiments.py)")
    ap.add_argument("--max-wall", type=float,
                    help="stop after this many seconds of wall time and say how far the run got "
                         "(progress on stderr every minute)")
    ap.add_argument("--report", action="store_true",
                    help="where the time went: downlink use by host state, start and tail, "
                         "links' use over the pull (bench/sim/report.py)")
    args = ap.parse_args(argv)
    sc = scaled(SCENARIOS[args.scenario](), args.hosts, args.scale)
    faults = {"wave": args.wave, "die": args.die, "die_at": args.die_at, "slow": args.slow,
              "corrupt": args.corrupt, "restart_at": args.restart_at}
    sc = replace(sc, **{k: v for k, v in faults.items() if v is not None})
    if args.size:
        sc = replace(sc, length=int(args.size * (1 << 20)))
    if args.piece_size:
        sc.params.piece_size = args.piece_size << 20
    if args.children:
        experiments.children(args.children)
    for name in args.experiment:
        experiments.EXPERIMENTS[name]()
    if args.readahead:
        sc.params.readahead = args.readahead << 20
    if args.sched_cores:
        sc.params.sched_cores = args.sched_cores
    if args.edge_us is not None:
        call, _, piece = args.edge_us.partition(",")
        sc.params.edge_call_us, sc.params.edge_piece_us = float(call), float(piece or 0)
    if args.wake_limit is not None:
        sc.params.wake_limit = args.wake_limit
    result = run(sc, args.seed, args.max_wall, args.report)
    print("\n".join(result.lines()))
    return 0 if result.finished == result.survivors else 1


if __name__ == "__main__":
    sys.exit(main())
