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
within a run each naiad measure sits between two baseline measures (before and after; naiad's
time is compared with their mean; `--no-aba`: the one before only), each pull starting with
every process quiet and dirty pages synced. `--aa` replaces each naiad measure by another
baseline (naiad's pull still runs, untimed, so later pairs start from the same state): the
ratio then shows what the method itself contributes, ~1.0 if it is fair. On a shared machine
the noise is other work beside a pull: each pull records every core's busy time beyond its own
processes' ("others", and who), and a pair with more than CONTENDED ms/MiB of it beside any of
its pulls is contended; the table gives the ratio over the uncontended pairs too.
`--prepare prefault` touches and frees 8 x --size of memory (at most 4 GiB) before each timed
pull, against memory a Firecracker host took back (docs/benchmarks.md, "A fair baseline"); it
measured no fairer here and adds the kernel's page reporting beside the pulls, so it is off.
Every timed curl must exit 0 with exactly --size MiB; after the timed pulls each copy (the
baseline's file, and every peer's, by curl | sha256sum) is checked against the digest. Prints
medians as MB/s and the ratio of times (naiad / baseline: 1.0 is as fast as curl from the
registry), as a markdown table; with --json FILE, all of it as JSON.

    python bench/dataplane.py --size 512 --runs 3 [--paths warm_verify] [--json out.json]
    python bench/dataplane.py --size 512 --runs 3 --cpu   # what limits each path, on N cores

Each timed pull also records the serving peer's CPU (user + system, all threads, from /proc)
per MiB delivered, and every process's (registry, scheduler, each peer, curl) with the busiest
single thread's; `--cpu` prints them per path with the bound they set on this machine's cores:
a pull cannot take less wall time than its total CPU / cores, nor than its busiest thread's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
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
    stat_fields,
    thread_ns,
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

PREPARES = ("none", "prefault")
# Others' CPU beside a pull above which its pair is counted as contended: a tenth of a cold
# pull's ~2.5-5 ms of CPU per MiB. In the A/A runs the slowest pulls had 1.4-3.2 ms/MiB of
# others' CPU beside them; pairs under 0.25 mostly agreed within 15 %.
CONTENDED = 0.25
PREFAULT_MAX = 4 << 30


def prefault(nbytes: int) -> None:
    """Touch `nbytes` of new anonymous memory and free it at once. On this VM (a Firecracker guest
    with free page reporting) the kernel's next page cache then comes from memory the host backs
    again, not from memory it took back, which costs ~10 times more to write into: 4 GiB kept four
    512 MiB writes in a row cheap, 1-2 GiB not (docs/benchmarks.md, "A fair baseline")."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    with mmap.mmap(-1, nbytes, flags=flags):
        pass


@dataclass(frozen=True)
class Snapshot:
    pids: dict[str, int]  # the pull's processes
    ticks: dict[str, int]  # process → user + system ticks, all its threads (ended ones too)
    threads: dict[str, int]  # "process main" or "process thread TID" → ns on a CPU (schedstat)
    children_s: float  # this process's reaped children (curl): user + system seconds
    self_s: float  # this process's own user + system seconds
    machine: tuple[int, int]  # all cores' busy ticks (user, nice, system, irq, softirq), steal
    everyone: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid → comm, ticks


def every_process() -> dict[int, tuple[str, int]]:
    """Name and ticks of every process on the machine (kernel threads too), to say who else
    ran. By pid: a kernel worker's name changes with the work it runs."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = stat_fields(text)
        out[int(stat.parent.name)] = comm, int(fields[11]) + int(fields[12])
    return out


def machine_ticks() -> tuple[int, int]:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return user + nice + system + irq + softirq, steal


def snapshot(procs: dict[str, int]) -> Snapshot:
    threads = {}
    for name, pid in procs.items():
        for tid, ns in thread_ns(pid).items():
            label = "main" if tid == pid else f"thread {tid}"
            threads[f"{name} {label}"] = ns
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return Snapshot(procs, {name: cpu_ticks(pid) for name, pid in procs.items()}, threads,
                    children.ru_utime + children.ru_stime, own.ru_utime + own.ru_stime,
                    machine_ticks(), every_process())


@dataclass
class Cpu:
    """What one timed pull cost in CPU, in ms per MiB delivered."""
    by_process: dict[str, float]  # each process, all its threads; curl's from its rusage
    busiest: str  # the busiest single thread: "a main" (a peer's event loop), "a thread", "curl"
    busiest_ms_per_MiB: float
    # What else ran meanwhile: every core's busy time minus the pull's processes' and the
    # bench's own (other users of this shared machine, kernel threads), and the time the
    # hypervisor ran something else on our cores (steal). Not part of `total`.
    others_ms_per_MiB: float = 0.0
    steal_ms_per_MiB: float = 0.0
    others_top: list[tuple[str, float]] = field(default_factory=list)  # who, ms/MiB: the top 3

    @property
    def total(self) -> float:
        return sum(self.by_process.values())

    def bound(self, cores: int) -> float:
        """The least wall time per MiB this CPU allows on `cores` cores: all of it spread evenly,
        and no less than the busiest thread's, which runs on one."""
        return max(self.total / cores, self.busiest_ms_per_MiB)


def cpu_between(before: Snapshot, after: Snapshot, mib: float) -> Cpu:
    by = {name: (after.ticks[name] - ticks) * 1000 / TICK / mib
          for name, ticks in before.ticks.items()}
    by["curl"] = (after.children_s - before.children_s) * 1000 / mib
    # A thread that ended during the pull is missing from `after`: its share counts in its
    # process's ticks, not here.
    threads = {k: (ns - before.threads.get(k, 0)) / 1e6 / mib for k, ns in after.threads.items()}
    threads["curl"] = by["curl"]  # curl moves the bytes on one thread
    busiest = max(threads, key=threads.__getitem__)
    label = busiest.rsplit(" ", 1)[0] if " thread " in busiest else busiest  # drop the tid
    busy = (after.machine[0] - before.machine[0]) * 1000 / TICK / mib
    own = (after.self_s - before.self_s) * 1000 / mib
    steal = (after.machine[1] - before.machine[1]) * 1000 / TICK / mib
    ours = {os.getpid(), *before.pids.values()}
    others = sorted(((f"{comm} {pid}", (ticks - before.everyone.get(pid, ("", 0))[1])
                      * 1000 / TICK / mib)
                     for pid, (comm, ticks) in after.everyone.items() if pid not in ours),
                    key=lambda x: -x[1])
    return Cpu(by, label, threads[busiest], max(0.0, busy - sum(by.values()) - own), steal,
               [(who, round(ms, 2)) for who, ms in others[:3] if ms > 0])


@dataclass
class Pair:
    naiad_s: float  # with --aa, the second baseline's
    baseline_s: float
    cpu_ms_per_MiB: float  # the peer serving the timed pull (with --aa the registry): all threads
    naiad_cpu: Cpu
    baseline_cpu: Cpu
    baseline_after_s: float | None = None  # with --aba: the baseline again, after naiad's pull
    baseline_after_cpu: Cpu | None = None

    @property
    def contended(self) -> bool:
        """Whether anything else on the machine ran beside one of the pair's pulls for more
        than CONTENDED ms of CPU per MiB (on a shared machine the usual cause of a slow pull)."""
        cpus = (self.naiad_cpu, self.baseline_cpu, self.baseline_after_cpu)
        return any(c.others_ms_per_MiB > CONTENDED for c in cpus if c is not None)

    @property
    def baseline_mean_s(self) -> float:
        """What naiad's time is compared with: the baseline's, or with --aba the mean of the
        baseline's before and after it."""
        if self.baseline_after_s is None:
            return self.baseline_s
        return (self.baseline_s + self.baseline_after_s) / 2


@dataclass
class Run:
    pairs: dict[str, Pair]
    digest: str  # of the blob pushed
    copies: dict[str, str]  # who served it (registry, each peer) → sha256 of what curl got
    received: list[int]  # bytes each timed curl got


Timed = tuple[float, Cpu]


async def one_run(work: Path, registry: Registry, size: int, k: int,
                  paths: tuple[str, ...] = NAMES, *, prepare: str = "none",
                  aa: bool = False, aba: bool = True) -> Run:
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
        procs = {n.name: n.proc.popen.pid for n in cluster.nodes}
        procs["registry"] = registry.proc.popen.pid
        received: list[int] = []
        copies: dict[str, str] = {}

        async def timed(url: str, out: str | Path = "/dev/null", *,
                        untimed: bool = False) -> Timed:
            await quiet(procs.values())
            if prepare == "prefault" and not untimed:
                await asyncio.to_thread(prefault, min(8 * size, PREFAULT_MAX))
            before = snapshot(procs)
            got = await curl(url, out)
            after = snapshot(procs)
            if got.size != size:
                raise RuntimeError(f"{url}: {got.size} bytes, expected {size}")
            received.append(got.size)
            return got.seconds, cpu_between(before, after, size / MiB)

        async def to_new_file() -> Timed:
            new = run_dir / "baseline.bin"
            timing = await timed(origin, new)
            copies["registry"] = await sha256_of_file(new)
            new.unlink()
            return timing

        async def to_null() -> Timed:
            return await timed(origin)

        pairs: dict[str, Pair] = {}

        async def pair(name: str, baseline: Callable[[], Awaitable[Timed]], serving: str,
                       naiad_url: str) -> None:
            """The baseline, then naiad's pull from `serving`; with --aa the baseline again in
            naiad's place and naiad's pull after it, untimed, so the next pair starts alike;
            with --aba the baseline once more at the end."""
            base_s, base_cpu = await baseline()
            if aa:
                seconds, cpu = await baseline()
                await timed(naiad_url, untimed=True)
                serving = "registry"
            else:
                seconds, cpu = await timed(naiad_url)
            after, after_cpu = await baseline() if aba else (None, None)
            pairs[name] = Pair(seconds, base_s, cpu.by_process[serving], cpu, base_cpu, after,
                               after_cpu)

        if "cold" in paths:
            await pair("cold", to_new_file, "a", a.url + path)
        else:  # A must hold it for the other paths: pulled untimed
            await timed(a.url + path, untimed=True)
        if "p2p" in paths:
            await pair("p2p", to_new_file, "b", peers["b"].url + path)
        if "warm_verify" in paths:
            await pair("warm_verify", to_null, "a", a.url + path)
        if "warm_no_verify" in paths:
            plain = peers["plain"].url + path
            await timed(plain, untimed=True)  # fills its store (from A, and B if any)
            await pair("warm_no_verify", to_null, "plain", plain)
        for peer in peers.values():  # what each peer stored and serves, after the timed pulls
            copies[peer.name] = await curl_sha256(peer.url + path)
        wrong = {who: got for who, got in copies.items() if got != digest}
        if wrong:
            raise RuntimeError(f"copies that do not match {digest}: {wrong}")
        return Run(pairs, digest, copies, received)
    finally:
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def cpu_summary(cpus: list[Cpu], seconds: list[float], base_s: list[float], mib: float,
                cores: int) -> dict:
    """Medians over the runs of one side's CPU, the bound it sets on `cores` cores and that
    bound over the baseline's measured time (the best ratio this CPU allows)."""
    return {
        "wall_ms_per_MiB": statistics.median(s * 1000 / mib for s in seconds),
        "by_process": {n: statistics.median(c.by_process[n] for c in cpus)
                       for n in cpus[0].by_process},
        "total": statistics.median(c.total for c in cpus),
        "busiest": [c.busiest for c in cpus],
        "busiest_ms_per_MiB": statistics.median(c.busiest_ms_per_MiB for c in cpus),
        "others_ms_per_MiB": statistics.median(c.others_ms_per_MiB for c in cpus),
        "steal_ms_per_MiB": statistics.median(c.steal_ms_per_MiB for c in cpus),
        "bound_ms_per_MiB": statistics.median(c.bound(cores) for c in cpus),
        "bound_ratio": statistics.median(c.bound(cores) / (b * 1000 / mib)
                                         for c, b in zip(cpus, base_s, strict=True)),
    }


def summarise(runs: list[Run], size: int, cores: int = os.cpu_count() or 1) -> dict[str, dict]:
    out = {}
    for p in PATHS:
        if p.name not in runs[0].pairs:
            continue
        pairs = [r.pairs[p.name] for r in runs]
        naiad = [size / x.naiad_s / 1e6 for x in pairs]
        base = [size / x.baseline_mean_s / 1e6 for x in pairs]
        ratio = [x.naiad_s / x.baseline_mean_s for x in pairs]
        cpu = [x.cpu_ms_per_MiB for x in pairs]
        base_s = [x.baseline_mean_s for x in pairs]
        # Pairs no other work overlapped (see Pair.contended): the same ratio, less noise.
        clean = [x.naiad_s / x.baseline_mean_s for x in pairs if not x.contended]
        mib = size / MiB
        out[p.name] = {
            "naiad": p.naiad, "baseline": p.baseline,
            "naiad_MBps": naiad, "baseline_MBps": base, "ratio": ratio, "cpu_ms_per_MiB": cpu,
            "uncontended_ratio": clean,
            "median": {"naiad_MBps": statistics.median(naiad),
                       "baseline_MBps": statistics.median(base),
                       "ratio": statistics.median(ratio),
                       "cpu_ms_per_MiB": statistics.median(cpu),
                       "uncontended_ratio": statistics.median(clean) if clean else None},
            "cpu": {"cores": cores,
                    "naiad": cpu_summary([x.naiad_cpu for x in pairs],
                                         [x.naiad_s for x in pairs], base_s, mib, cores),
                    # The wall time naiad is compared with (with --aba the mean), the CPU of
                    # the baseline before naiad's pull.
                    "baseline": cpu_summary([x.baseline_cpu for x in pairs], base_s, base_s,
                                            mib, cores)},
        }
    return out


def runs_of(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def table(paths: dict[str, dict]) -> str:
    lines = ["| path | naiad MB/s | baseline | baseline MB/s | time / baseline "
             "| serving peer's CPU, ms/MiB | time / baseline, uncontended pairs |",
             "|---|---|---|---|---|---|---|"]
    for name, r in paths.items():
        m = r["median"]
        clean = (f"{m['uncontended_ratio']:.2f} × ({runs_of(r['uncontended_ratio'], '.2f')})"  # noqa: RUF001
                 if r["uncontended_ratio"] else "none")
        lines.append(
            f"| {name}: {r['naiad']} | {m['naiad_MBps']:,.0f} ({runs_of(r['naiad_MBps'], ',.0f')})"
            f" | {r['baseline']} | {m['baseline_MBps']:,.0f} "
            f"({runs_of(r['baseline_MBps'], ',.0f')}) | {m['ratio']:.2f} × "  # noqa: RUF001
            f"({runs_of(r['ratio'], '.2f')}) | {m['cpu_ms_per_MiB']:.2f} "
            f"({runs_of(r['cpu_ms_per_MiB'], '.2f')}) | {clean} |")
    return "\n".join(lines)


def cpu_table(paths: dict[str, dict]) -> str:
    """Per path and side, medians in ms per MiB: wall time, each process's CPU, the busiest
    thread, the bound on this machine's cores, and that bound over the baseline's wall time
    beside the measured ratio."""
    procs = sorted({n for r in paths.values() for side in ("naiad", "baseline")
                    for n in r["cpu"][side]["by_process"]}, key=lambda n: (n == "curl", n))
    cores = next(iter(paths.values()))["cpu"]["cores"] if paths else 1
    lines = [f"| path | side | wall | {' | '.join(procs)} | all | busiest thread "
             f"| bound on {cores} cores | bound / baseline wall | measured / baseline wall "
             "| others, steal |",
             "|---|---|---|" + "---|" * len(procs) + "---|---|---|---|---|---|"]
    for name, r in paths.items():
        for side in ("baseline", "naiad"):
            c = r["cpu"][side]
            cells = [f"{c['by_process'][n]:.2f}" if n in c["by_process"] else "" for n in procs]
            busiest = max(set(c["busiest"]), key=c["busiest"].count)
            measured = r["median"]["ratio"] if side == "naiad" else 1.0
            lines.append(
                f"| {name} | {side} | {c['wall_ms_per_MiB']:.2f} | {' | '.join(cells)} "
                f"| {c['total']:.2f} | {busiest} {c['busiest_ms_per_MiB']:.2f} "
                f"| {c['bound_ms_per_MiB']:.2f} | {c['bound_ratio']:.2f} × "  # noqa: RUF001
                f"| {measured:.2f} × "  # noqa: RUF001
                f"| {c['others_ms_per_MiB']:.2f}, {c['steal_ms_per_MiB']:.2f} |")
    return "\n".join(lines)


async def measure(size: int, runs: int, paths: tuple[str, ...] = NAMES, *,
                  prepare: str = "none", aa: bool = False, aba: bool = True) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="naiad-dataplane-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry")
        try:
            await registry.ready()
            return [await one_run(work, registry, size, k, paths, prepare=prepare, aa=aa,
                                  aba=aba) for k in range(runs)]
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
    parser.add_argument("--prepare", choices=PREPARES, default="none",
                        help="before each timed pull: nothing more than quiet and sync "
                        "(default), or touch and free memory")
    parser.add_argument("--aa", action="store_true",
                        help="time a second baseline in naiad's place (checks the method)")
    parser.add_argument("--aba", action=argparse.BooleanOptionalAction, default=True,
                        help="time the baseline again after naiad's pull and compare naiad "
                        "with the mean of the two (default; --no-aba: the one before only)")
    parser.add_argument("--cpu", action="store_true",
                        help="also print every process's CPU per path and the bound it sets")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the results here")
    args = parser.parse_args()
    paths = tuple(n.strip() for n in args.paths.split(",") if n.strip())
    if not paths or set(paths) - set(NAMES):
        parser.error(f"--paths: choose from {', '.join(NAMES)}")
    config = fresh_config()
    try:
        results = asyncio.run(measure(args.size * MiB, args.runs, paths,
                                      prepare=args.prepare, aa=args.aa, aba=args.aba))
    finally:
        shutil.rmtree(config, ignore_errors=True)
    summary = summarise(results, args.size * MiB)
    where = machine()
    result = {
        "command": "python bench/dataplane.py " + shlex.join(sys.argv[1:]),
        "machine": where, "commit": commit(), "size_MiB": args.size, "runs": args.runs,
        "prepare": args.prepare, "aa": args.aa, "aba": args.aba,
        "paths": summary,
        # Reached only when every timed curl got --size MiB and every copy matched its digest.
        "verified": [{"digest": r.digest, "copies": r.copies, "received": r.received}
                     for r in results],
        "pairs": [{name: asdict(p) for name, p in r.pairs.items()} for r in results],
    }
    aa = "; A/A: naiad replaced by a second baseline" if args.aa else ""
    aa += "; baseline before and after naiad, their mean" if args.aba else ""
    print(f"# {result['command']}; naiad {result['commit']}; {where['node']}, "
          f"{where['cores']} cores, Linux {where['kernel']}, Python {where['python']}, "
          f"{where['date']}; prepare {args.prepare}{aa}; medians of {args.runs} runs "
          "(each run's values in brackets)")
    print(table(summary))
    if args.cpu:
        print()
        print(cpu_table(summary))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
