"""Network faults injected inside the lab's namespaces while a system pulls (issue 13):
`python -m bench.swarm --fault NAME`.

This machine's kernel is built without sch_netem (CONFIG_NET_SCH_NETEM unset, no modules), so
each fault is made with netfilter (iptables, nft backend, `raw` table) inside the hosts' own
namespaces. What netem on a host's eth0 egress would do to the packets a host sends is done
where they arrive, on every other host's PREROUTING: a packet dropped there is silently lost to
its sender, as with netem (a drop in the sender's OUTPUT is reported to its TCP at once), and a
packet held there no longer counts against the sender's socket (held in its own namespace, it
would, and TCP small queues would throttle the flow to a trickle; netem orphans the packet).

- `loss`: 2 % of the packets every peer sends are lost (`statistic --mode random`), with the
  peers' TCP segmentation held to one segment per skb (`gso_max_segs 1`): a drop is a packet;
- `delay`: every packet a peer sends is held 50 ± 10 ms, uniform, reordering included
  (netem's `delay 50ms 10ms`): NFQUEUE to `bench/swarm/delay.py` on every host;
- `parent-cut`: at 30 % of all bytes delivered, the peer host holding the most pieces loses its
  link for good (everything to and from it dropped; its own client no longer counts);
- `partition`: at 30 %, half the peers (p0, p2, ...) and the scheduler lose each other (its
  TCP and UDP ports, both ways) for 10 s; peer-to-peer and origin traffic still flow;
- `origin-flap`: from 1 s after the start, everything to and from the origin host (registry and
  scheduler) is dropped for 2 s, then passes for 3 s, for the whole pull.

A fault starts when the clients are released and is undone when the pull ends.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.swarm.topology import IFACE, Host, Lab, sh

FAULTS = ("loss", "delay", "parent-cut", "partition", "origin-flap")
LOSS = 0.02
DELAY_MS, JITTER_MS = 50, 10
TRIGGER = 0.30  # share of all bytes delivered at which the mid-transfer faults strike
PARTITION_S = 10.0
FLAP_FIRST_S, FLAP_DOWN_S, FLAP_UP_S = 1.0, 2.0, 3.0
SCHEDULER_PORTS = {"tcp": 8002, "udp": 8003}  # naiad_swarm's --listen and --udp


def _pre(*match: str) -> list[str]:
    return ["PREROUTING", "-i", IFACE, *match]


def scheduler_rules(peer_ip: str, scheduler_ip: str) -> tuple[list[list[str]], list[list[str]]]:
    """Rules for the scheduler's host and for the peer that cut the two off, and nothing else."""
    at_scheduler, at_peer = [], []
    for proto, port in SCHEDULER_PORTS.items():
        at_scheduler.append(_pre("-s", peer_ip, "-p", proto, "--dport", str(port), "-j", "DROP"))
        at_peer.append(_pre("-s", scheduler_ip, "-p", proto, "--sport", str(port), "-j", "DROP"))
    return at_scheduler, at_peer


def partitioned(peers: list[Host]) -> list[Host]:
    return peers[::2]


def most_pieces(held: dict[str, int]) -> str | None:
    """The host holding the most pieces (ties: the lowest name, so a run can be retold)."""
    return min(held, key=lambda h: (-held[h], h)) if held else None


async def iptables(host: Host, *args: str) -> None:
    """One iptables command (raw table) in the host's namespace; without blocking the loop
    that samples the clients."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", host.ns, "iptables", "-w", "-t", "raw", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"iptables {' '.join(args)} in {host.ns}: {err.decode().strip()}")


async def on_each(pairs: list[tuple[Host, list[str]]]) -> None:
    """Add rules on several hosts at once (one host's rules in order)."""
    by_host: dict[Host, list[list[str]]] = {}
    for host, rule in pairs:
        by_host.setdefault(host, []).append(rule)

    async def add(host: Host, rules: list[list[str]]) -> None:
        for rule in rules:
            await iptables(host, "-A", *rule)

    await asyncio.gather(*(add(h, rs) for h, rs in by_host.items()))


async def matched(host: Host) -> int:
    """Packets the host's fault rules have matched so far (dropped or delayed)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", host.ns, "iptables", "-w", "-t", "raw", "-L", "PREROUTING",
        "-v", "-x", "-n", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    rows = out.decode().splitlines()[2:]  # past the chain's policy line and the header
    return sum(int(row.split()[0]) for row in rows if row.split())


async def flush(hosts: list[Host]) -> None:
    await asyncio.gather(*(iptables(h, "-F") for h in hosts))


async def isolate(lab: Lab, host: Host) -> None:
    """Drop everything to and from `host`, where it arrives."""
    await on_each([(host, _pre("-j", "DROP"))]
                  + [(other, _pre("-s", host.ip, "-j", "DROP"))
                     for other in lab.hosts if other is not host])


def prepare(lab: Lab, name: str) -> None:
    """Set-up that must precede any connection (once, after the lab is created)."""
    if name == "loss":  # one segment per skb: TCP reads it when it connects
        for host in lab.peers:
            sh("ip", "-n", host.ns, "link", "set", IFACE, "gso_max_segs", "1")


@dataclass
class FaultRun:
    """One fault over one pull. `progress()` is the share of all bytes the clients hold;
    `holdings()` each peer host's pieces (the system's own view, or the clients' bytes)."""

    lab: Lab
    name: str
    progress: Callable[[], float]
    holdings: Callable[[], Awaitable[dict[str, int]]]
    cut: set[str] = field(default_factory=set)  # hosts whose clients no longer count
    events: list[tuple[float, str]] = field(default_factory=list)
    matched: int = 0  # packets the rules dropped or held (a flap's last phase, if still up)
    _started: float = 0.0
    _daemons: list[asyncio.subprocess.Process] = field(default_factory=list)

    def _event(self, what: str) -> None:
        self.events.append((round(time.perf_counter() - self._started, 2), what))

    async def setup(self, logdir: Path) -> None:
        """Before the clients are released: the delay daemons, bound and listening."""
        if self.name != "delay":
            return
        for host in self.lab.hosts:
            proc = await self.lab.spawn(host, [
                sys.executable, "-m", "bench.swarm.delay", "--ms", str(DELAY_MS),
                "--jitter", str(JITTER_MS)], logdir / f"delay-{host.name}.log", pipes=True)
            self._daemons.append(proc)
            assert proc.stdout is not None
            if (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() != b"ready":
                raise RuntimeError(f"delay daemon in {host.ns} did not start")

    async def run(self, started: float) -> None:
        """The fault's schedule from the clients' release; cancelled when the pull ends."""
        self._started = started
        lab = self.lab
        from_peers = ["!", "-s", lab.origin.ip]
        if self.name == "loss":
            await on_each([(host, _pre(*from_peers, "-m", "statistic", "--mode", "random",
                                       "--probability", str(LOSS), "-j", "DROP"))
                           for host in lab.hosts])
            self._event(f"{LOSS:.0%} of what every peer sends lost")
        elif self.name == "delay":
            await on_each([(host, _pre(*from_peers, "-j", "NFQUEUE", "--queue-num", "0",
                                       "--queue-bypass"))
                           for host in lab.hosts])
            self._event(f"what every peer sends held {DELAY_MS} ± {JITTER_MS} ms")
        elif self.name == "parent-cut":
            await self._reach(TRIGGER)
            held = await self.holdings()
            victim = next((h for h in lab.peers if h.name == most_pieces(held)), None)
            if victim is None:
                self._event("no holder to cut")
                return
            await isolate(lab, victim)
            self.cut.add(victim.name)
            self._event(f"cut {victim.name} off (pieces held: {held})")
        elif self.name == "partition":
            await self._reach(TRIGGER)
            victims = partitioned(lab.peers)
            pairs = []
            for host in victims:
                at_scheduler, at_peer = scheduler_rules(host.ip, lab.origin.ip)
                pairs += [(lab.origin, r) for r in at_scheduler] + [(host, r) for r in at_peer]
            await on_each(pairs)
            self._event(f"{' '.join(h.name for h in victims)} and the scheduler cut apart")
            await asyncio.sleep(PARTITION_S)
            self.matched += sum(await asyncio.gather(*(matched(h) for h in lab.hosts)))
            await flush([lab.origin, *victims])
            self._event("partition healed")
        elif self.name == "origin-flap":
            await asyncio.sleep(FLAP_FIRST_S)
            while True:
                await isolate(lab, lab.origin)
                self._event("origin down")
                await asyncio.sleep(FLAP_DOWN_S)
                self.matched += sum(await asyncio.gather(*(matched(h) for h in lab.hosts)))
                await flush(lab.hosts)
                self._event("origin up")
                await asyncio.sleep(FLAP_UP_S)
        else:
            raise ValueError(f"unknown fault {self.name!r}")

    async def _reach(self, share: float) -> None:
        while self.progress() < share:  # noqa: ASYNC110 - sampled from the copies on disk
            await asyncio.sleep(0.05)
        self._event(f"progress {self.progress():.0%}")

    async def undo(self) -> None:
        self.matched += sum(await asyncio.gather(*(matched(h) for h in self.lab.hosts)))
        await flush(self.lab.hosts)
        await asyncio.gather(*(self.lab.stop(p, grace=2.0) for p in self._daemons))
        self._daemons.clear()

    def notes(self) -> dict[str, Any]:
        return {"fault": self.name, "events": self.events, "cut": sorted(self.cut),
                "packets_matched": self.matched}
