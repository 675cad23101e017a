"""The peer's data plane on loopback (issue 12): four paths, each beside its baseline in the same
run, the real curl binary as every client, Debian's docker-registry as the origin, an in-memory
scheduler and real peers as processes.

- cold: registry → a fresh peer (verify, store) → curl → /dev/null,
  against registry → curl → a new file;
- p2p: peer A holds the blob → a fresh peer B (verify, store) → curl → /dev/null,
  against the same baseline;
- warm_verify: the peer holding it, re-hashing on serve → curl → /dev/null,
  against registry → curl → /dev/null;
- warm_no_verify: a peer run with --no-verify-on-serve (sendfile) holding it → curl → /dev/null,
  against the same.

Each run pushes a fresh random blob and starts a fresh scheduler and fresh peers (fresh stores);
within a run each naiad measure directly follows its own baseline measure. Every timed curl must
exit 0 with exactly --size MiB; after the timed pulls each copy (the baseline's file, and every
peer's, by curl | sha256sum) is checked against the digest. Prints medians as MB/s and the ratio
of times (naiad / baseline: 1.0 is as fast as curl from the registry), as a markdown table; with
--json FILE, all of it as JSON.

    python bench/dataplane.py --size 512 --runs 3 [--paths warm_verify] [--json out.json]

Each timed pull also records the serving peer's CPU (user + system, all threads, from /proc)
per MiB delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loopback import (
    TICK,
    MiB,
    commit,
    cpu_ticks,
    curl,
    curl_sha256,
    fresh_config,
    machine,
    push_random,
    quiet,
    sha256_of_file,
)
from tests.cluster import Cluster, Registry

PEER_ARGS = ("--scrub-rate", "0")  # the scrubber would re-hash stores between measures


@dataclass(frozen=True)
class DataPath:
    name: str
    naiad: str
    baseline: str


PATHS = (
    DataPath("cold", "registry → fresh peer (verify, store) → curl → /dev/null",
             "registry → curl → new file"),
    DataPath("p2p", "peer A holds it → fresh peer B (verify, store) → curl → /dev/null",
             "registry → curl → new file"),
    DataPath("warm_verify", "peer holding it, verify on serve → curl → /dev/null",
             "registry → curl → /dev/null"),
    DataPath("warm_no_verify", "peer holding it, --no-verify-on-serve (sendfile) → curl → "
             "/dev/null", "registry → curl → /dev/null"),
)


NAMES = tuple(p.name for p in PATHS)


@dataclass
class Pair:
    naiad_s: float
    baseline_s: float
    cpu_ms_per_MiB: float  # the peer serving the timed pull: all its threads


@dataclass
class Run:
    pairs: dict[str, Pair]
    digest: str  # of the blob pushed
    copies: dict[str, str]  # who served it (registry, each peer) → sha256 of what curl got
    received: list[int]  # bytes each timed curl got


async def one_run(work: Path, registry: Registry, size: int, k: int,
                  paths: tuple[str, ...] = NAMES) -> Run:
    run_dir = work / f"run{k}"
    run_dir.mkdir()
    repo = f"bench/dataplane{k}"
    digest = await push_random(registry.url, repo, size, run_dir)
    path = f"/v2/{repo}/blobs/{digest}"
    origin = registry.url + path
    cluster = Cluster(run_dir)
    try:
        sched = await cluster.scheduler()
        wanted = [("a", ())]
        if "p2p" in paths:
            wanted.append(("b", ()))
        if "warm_no_verify" in paths:
            wanted.append(("plain", ("--no-verify-on-serve",)))
        peers = dict(zip((n for n, _ in wanted), await asyncio.gather(*(
            cluster.peer(name, sched.url, registry.url, *PEER_ARGS, *extra)
            for name, extra in wanted)), strict=True))
        a = peers["a"]
        pids = [n.proc.popen.pid for n in cluster.nodes] + [registry.proc.popen.pid]
        received: list[int] = []
        copies: dict[str, str] = {}
        cpu: dict[str, float] = {}

        async def timed(url: str, out: str | Path = "/dev/null", *,
                        serving: str | None = None) -> float:
            await quiet(pids)
            pid = peers[serving].proc.popen.pid if serving else None
            before = cpu_ticks(pid) if pid else 0
            got = await curl(url, out)
            if got.size != size:
                raise RuntimeError(f"{url}: {got.size} bytes, expected {size}")
            if pid:  # the serving peer's CPU (all threads) per MiB delivered
                cpu[serving] = (cpu_ticks(pid) - before) * 1000 / TICK / (size / MiB)
            received.append(got.size)
            return got.seconds

        async def to_new_file() -> float:
            new = run_dir / "baseline.bin"
            seconds = await timed(origin, new)
            copies["registry"] = await sha256_of_file(new)
            new.unlink()
            return seconds

        pairs: dict[str, Pair] = {}
        if "cold" in paths:
            base = await to_new_file()
            pairs["cold"] = Pair(await timed(a.url + path, serving="a"), base, cpu["a"])
        else:  # A must hold it for the other paths: pulled untimed
            await timed(a.url + path)
        if "p2p" in paths:
            base = await to_new_file()
            pairs["p2p"] = Pair(await timed(peers["b"].url + path, serving="b"), base,
                                cpu["b"])
        if "warm_verify" in paths:
            base = await timed(origin)
            pairs["warm_verify"] = Pair(await timed(a.url + path, serving="a"), base, cpu["a"])
        if "warm_no_verify" in paths:
            plain = peers["plain"]
            await timed(plain.url + path)  # fills its store (from A, and B if any), untimed
            base = await timed(origin)
            pairs["warm_no_verify"] = Pair(await timed(plain.url + path, serving="plain"),
                                           base, cpu["plain"])
        for peer in peers.values():  # what each peer stored and serves, after the timed pulls
            copies[peer.name] = await curl_sha256(peer.url + path)
        wrong = {who: got for who, got in copies.items() if got != digest}
        if wrong:
            raise RuntimeError(f"copies that do not match {digest}: {wrong}")
        return Run(pairs, digest, copies, received)
    finally:
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def summarise(runs: list[Run], size: int) -> dict[str, dict]:
    out = {}
    for p in PATHS:
        if p.name not in runs[0].pairs:
            continue
        pairs = [r.pairs[p.name] for r in runs]
        naiad = [size / x.naiad_s / 1e6 for x in pairs]
        base = [size / x.baseline_s / 1e6 for x in pairs]
        ratio = [x.naiad_s / x.baseline_s for x in pairs]
        cpu = [x.cpu_ms_per_MiB for x in pairs]
        out[p.name] = {
            "naiad": p.naiad, "baseline": p.baseline,
            "naiad_MBps": naiad, "baseline_MBps": base, "ratio": ratio, "cpu_ms_per_MiB": cpu,
            "median": {"naiad_MBps": statistics.median(naiad),
                       "baseline_MBps": statistics.median(base),
                       "ratio": statistics.median(ratio),
                       "cpu_ms_per_MiB": statistics.median(cpu)},
        }
    return out


def table(paths: dict[str, dict]) -> str:
    def runs(values: list[float], fmt: str) -> str:
        return ", ".join(format(v, fmt) for v in values)

    lines = ["| path | naiad MB/s | baseline | baseline MB/s | time / baseline "
             "| serving peer's CPU, ms/MiB |",
             "|---|---|---|---|---|---|"]
    for name, r in paths.items():
        m = r["median"]
        lines.append(
            f"| {name}: {r['naiad']} | {m['naiad_MBps']:,.0f} ({runs(r['naiad_MBps'], ',.0f')})"
            f" | {r['baseline']} | {m['baseline_MBps']:,.0f} "
            f"({runs(r['baseline_MBps'], ',.0f')}) | {m['ratio']:.2f} × "  # noqa: RUF001
            f"({runs(r['ratio'], '.2f')}) | {m['cpu_ms_per_MiB']:.2f} "
            f"({runs(r['cpu_ms_per_MiB'], '.2f')}) |")
    return "\n".join(lines)


async def measure(size: int, runs: int, paths: tuple[str, ...] = NAMES) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="naiad-dataplane-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        try:
            await registry.ready()
            return [await one_run(work, registry, size, k, paths) for k in range(runs)]
        finally:
            registry.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="blob size in MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--paths", default=",".join(NAMES),
                        help="comma-separated, of " + ", ".join(NAMES) + " (default: all); "
                        "a path left out that another needs is run untimed")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the results here")
    args = parser.parse_args()
    paths = tuple(n.strip() for n in args.paths.split(",") if n.strip())
    if not paths or set(paths) - set(NAMES):
        parser.error(f"--paths: choose from {', '.join(NAMES)}")
    config = fresh_config()
    try:
        results = asyncio.run(measure(args.size * MiB, args.runs, paths))
    finally:
        shutil.rmtree(config, ignore_errors=True)
    summary = summarise(results, args.size * MiB)
    where = machine()
    result = {
        "command": "python bench/dataplane.py " + shlex.join(sys.argv[1:]),
        "machine": where, "commit": commit(), "size_MiB": args.size, "runs": args.runs,
        "paths": summary,
        # Reached only when every timed curl got --size MiB and every copy matched its digest.
        "verified": [{"digest": r.digest, "copies": r.copies, "received": r.received}
                     for r in results],
    }
    print(f"# {result['command']}; naiad {result['commit']}; {where['node']}, "
          f"{where['cores']} cores, Linux {where['kernel']}, Python {where['python']}, "
          f"{where['date']}; medians of {args.runs} runs (each run's values in brackets)")
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
