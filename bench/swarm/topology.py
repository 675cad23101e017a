"""The lab's network: one namespace per host, each wired by a veth to a bridge that lives in a
namespace of its own, with a token bucket (htb) on every host's egress. Also the processes the
lab starts inside those namespaces, and the machine's CPU counters.

Everything the lab creates is named with PREFIX, so `destroy_leftovers` can remove what a
crashed run left behind. Nothing here touches the root namespace's interfaces or routes: the
hosts reach only each other, and the orchestrator reaches them through `ip netns exec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

PREFIX = "swarm-"
BRIDGE_NS = f"{PREFIX}br"
BRIDGE = "br0"
IFACE = "eth0"
ORIGIN_IP = "10.77.0.1"
PREFIX_LEN = 16


@dataclass(frozen=True)
class Host:
    name: str  # "origin", "p0", "p1", …: also the bridge-side veth name
    ip: str
    rate_bps: int  # egress token-bucket rate, bits per second

    @property
    def ns(self) -> str:
        return PREFIX + self.name


def peer_ip(k: int) -> str:
    return f"10.77.{1 + k // 250}.{1 + k % 250}"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _sysctl(ns: str, *settings: str) -> None:
    for s in settings:  # best effort: a kernel without the key is fine
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", s, check=False)


class Lab:
    """An origin and `n` peer hosts on one bridge. `create()` builds it, `destroy()` (safe to
    call at any point, any number of times) kills every process started in it and removes it."""

    def __init__(self, n: int, origin_bps: int, peer_bps: int, cwd: Path) -> None:
        if not 1 <= n <= 1000:
            raise ValueError("between 1 and 1000 peers")
        self.origin = Host("origin", ORIGIN_IP, origin_bps)
        self.peers = [Host(f"p{k}", peer_ip(k), peer_bps) for k in range(n)]
        self.cwd = cwd
        self._procs: list[asyncio.subprocess.Process] = []
        self._namespaces: list[str] = []

    @property
    def hosts(self) -> list[Host]:
        return [self.origin, *self.peers]

    # -- topology --------------------------------------------------------------------------

    def create(self) -> None:
        self._add_ns(BRIDGE_NS)
        sh("ip", "-n", BRIDGE_NS, "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "-n", BRIDGE_NS, "link", "set", BRIDGE, "up")
        # Bridged frames need not cross iptables (br_netfilter is loaded on some kernels).
        _sysctl(BRIDGE_NS, "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0", "net.ipv6.conf.all.disable_ipv6=1")
        for host in self.hosts:
            self._add_host(host)

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _add_host(self, host: Host) -> None:
        self._add_ns(host.ns)
        # No IPv6 chatter (router solicitations, MLD) in the byte counters.
        _sysctl(host.ns, "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "link", "add", IFACE, "netns", host.ns, "type", "veth",
           "peer", "name", host.name, "netns", BRIDGE_NS)
        sh("ip", "-n", BRIDGE_NS, "link", "set", host.name, "master", BRIDGE, "up")
        sh("ip", "-n", host.ns, "addr", "add", f"{host.ip}/{PREFIX_LEN}", "dev", IFACE)
        sh("ip", "-n", host.ns, "link", "set", IFACE, "up")
        # Egress shaping: htb (it copes with GSO super-packets) at rate == ceil. Downloads,
        # the bridge's egress towards a host, are left unshaped.
        rate = f"{host.rate_bps}bit"
        sh("tc", "-n", host.ns, "qdisc", "add", "dev", IFACE, "root", "handle", "1:",
           "htb", "default", "1")
        sh("tc", "-n", host.ns, "class", "add", "dev", IFACE, "parent", "1:", "classid", "1:1",
           "htb", "rate", rate, "ceil", rate, "quantum", "60000")

    def destroy(self) -> None:
        self.kill_all()
        for ns in reversed(self._namespaces):
            _kill_ns_processes(ns)
            sh("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()

    def tx_bytes(self, host: Host) -> int:
        """Bytes the host's interface has sent (its egress through the shaper)."""
        out = sh("ip", "-j", "-s", "-n", host.ns, "link", "show", "dev", IFACE).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def shaping(self, host: Host) -> str:
        return sh("tc", "-n", host.ns, "class", "show", "dev", IFACE).stdout.strip()

    # -- processes -------------------------------------------------------------------------

    async def spawn(self, host: Host, argv: list[str], log: Path, *, pipes: bool = False,
                    env: dict[str, str] | None = None,
                    cwd: Path | None = None) -> asyncio.subprocess.Process:
        """Start `argv` inside the host's namespace, in a session of its own (so its whole
        group can be signalled). With `pipes`, stdin and stdout are pipes; stderr (and stdout
        otherwise) go to `log`."""
        with _open_log(log) as out:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", host.ns, *argv,
                stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if pipes else out, stderr=out,
                cwd=cwd or self.cwd, env={**os.environ, **(env or {})}, start_new_session=True)
        self._procs.append(proc)
        return proc

    @staticmethod
    async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM,
                   grace: float = 10.0) -> None:
        if proc.returncode is None:
            _killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                _killpg(proc.pid, signal.SIGKILL)
                await proc.wait()

    async def stop_after(self, proc: asyncio.subprocess.Process, seconds: float) -> None:
        """Give a process `seconds` to exit by itself, then stop it."""
        try:
            await asyncio.wait_for(proc.wait(), seconds)
        except TimeoutError:
            await self.stop(proc)

    async def reap(self, grace: float = 3.0) -> None:
        """Stop every process the lab started that still runs (SIGTERM, then SIGKILL after
        `grace`) and wait for each, so none outlives the event loop."""
        live = [p for p in self._procs if p.returncode is None]
        await asyncio.gather(*(self.stop(p, grace=grace) for p in live))
        self._procs = []

    def kill_all(self) -> None:
        """SIGKILL every process group the lab started that has not been reaped (synchronous:
        safe in a `finally` after the event loop is gone)."""
        for proc in self._procs:
            if proc.returncode is None:
                _killpg(proc.pid, signal.SIGKILL)
        self._procs = [p for p in self._procs if p.returncode is None]

    async def http_ok(self, host: Host, url: str) -> bool:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", host.ns, "curl", "-sf", "-o", "/dev/null",
            "--max-time", "2", url,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return await proc.wait() == 0

    async def wait_http(self, host: Host, url: str, seconds: float = 30.0,
                        proc: asyncio.subprocess.Process | None = None) -> None:
        deadline = time.monotonic() + seconds
        while not await self.http_ok(host, url):
            if proc is not None and proc.returncode is not None:
                raise RuntimeError(f"process for {url} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} (from {host.ns}) not ready after {seconds} s")
            await asyncio.sleep(0.1)

    async def http_get(self, host: Host, url: str, headers: dict[str, str] | None = None
                       ) -> bytes:
        extra = [arg for k, v in (headers or {}).items() for arg in ("-H", f"{k}: {v}")]
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", host.ns, "curl", "-sf", "--max-time", "10", *extra, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"GET {url} from {host.ns} failed (curl {proc.returncode})")
        return out


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")  # the caller's `with` closes it


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_ns_processes(ns: str) -> None:
    """SIGKILL whatever still runs inside a namespace the lab created."""
    out = sh("ip", "netns", "pids", ns, check=False).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def leftover_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0].startswith(PREFIX)]


def destroy_leftovers() -> list[str]:
    """Remove every namespace named with PREFIX (and whatever runs in it): what a crashed run
    left behind. Deleting a namespace deletes its veth ends and the bridge with it."""
    names = leftover_namespaces()
    for ns in names:
        _kill_ns_processes(ns)
    for ns in names:
        sh("ip", "netns", "del", ns, check=False)
    # The lab never leaves links in the root namespace; remove any a half-made run left.
    out = sh("ip", "-j", "link", "show", check=False).stdout or "[]"
    for link in json.loads(out):
        if link.get("ifname", "").startswith(PREFIX):
            sh("ip", "link", "del", link["ifname"], check=False)
    return names


class CpuSampler:
    """Where the machine's CPU went between `start()` and `stop()`: the busy fraction and its
    split (/proc/stat), the fraction of the time some task waited for a CPU (/proc/pressure/cpu),
    and, per given process, the CPU seconds it used and the seconds its main thread (the event
    loop, for naiad) sat runnable in the run queue waiting for a CPU (/proc/PID/schedstat)."""

    _FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

    def __init__(self, pids: dict[str, int] | None = None) -> None:
        self.pids = pids or {}
        self._t0: tuple[float, list[int], float] = (0.0, [], 0.0)
        self._p0: dict[str, tuple[float, float]] = {}

    @classmethod
    def _machine(cls) -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:1 + len(cls._FIELDS)]]

    @staticmethod
    def _pressure() -> float:
        """Seconds during which at least one task waited for a CPU (0 without PSI)."""
        try:
            with open("/proc/pressure/cpu") as f:
                some = f.readline()
        except OSError:
            return 0.0
        return int(some.rsplit("total=", 1)[1]) / 1e6

    @staticmethod
    def _proc(pid: int) -> tuple[float, float]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/schedstat") as f:
                waited_ns = int(f.read().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            return 0.0, 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), waited_ns / 1e9

    def start(self) -> None:
        self._t0 = (time.monotonic(), self._machine(), self._pressure())
        self._p0 = {name: self._proc(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, Any]:
        t0, m0, s0 = self._t0
        elapsed = time.monotonic() - t0
        delta = [b - a for a, b in zip(m0, self._machine(), strict=True)]
        total = sum(delta) or 1
        split = {name: d / total for name, d in zip(self._FIELDS, delta, strict=True)}
        out: dict[str, Any] = {
            "busy": 1.0 - split["idle"] - split["iowait"],
            "split": {k: round(v, 3) for k, v in split.items() if k not in ("idle", "nice")},
            "pressure": (self._pressure() - s0) / elapsed if elapsed else 0.0,
        }
        if self.pids:
            now = {name: self._proc(pid) for name, pid in self.pids.items()}
            out["cpu_seconds"] = {n: round(now[n][0] - self._p0[n][0], 2) for n in self.pids}
            out["runq_seconds"] = {n: round(now[n][1] - self._p0[n][1], 2) for n in self.pids}
        return out
