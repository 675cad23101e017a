"""The swarm: hosts whose peers drive the real `Acquisition` per piece against the real
`ClusterState`, over the simulated network (bench/sim/core.py).

What is the real code, run as is: `ClusterState` (every schedule, announce, report, heartbeat,
expiry, registration), the placement policy it calls, `Acquisition` (every step of every piece),
`bypass` (the batcher's answer to a `wait`), `announcements` (the outbox's messages).
What is modelled here, after the engine it stands for (peer/engine/engine.py and friends):

* the reader (reader.py): a whole-blob GET walks the pieces in order with a read-ahead of
  `readahead_pieces`, refilled half a window at a time; a host is done when its reader has every
  piece;
* the batcher (batcher.py): a host's asks in one instant travel in one schedule call, which
  long-polls (LONG_POLL_MS) while every piece in it must wait; its long poll is scheduler/
  store.py's `Waiters` around scheduler/waiting.py's core, run as is: woken when an
  announcement adds one of its pieces (the WAKE_PER_PIECE parked longest per piece), it
  re-decides the pieces announced since; when a peer expires or the map is sealed, and every
  RECHECK_SECONDS, all of them; a `wait` answered goes back into the next call;
* parents (fetch.py, upload.py): ranked parents tried in turn; one at its upload slots, or
  holding `per_address` slots for this child already, answers busy at once; a dead one fails
  once silent for the child's `Patience` (parents.py: STALL_SECONDS, less for a child that
  receives fast), the same timeout its dial takes; a corrupt one's bytes fail verification
  and are reported;
* origin runs (origin.py): one ranged request per lease run, pieces in order, progress
  reported every PROGRESS_EVERY, a run stopped between pieces once the scheduler was silent
  for LEASE_LAPSE;
* the outbox (sched_outbox.py): announcements coalesced for ANNOUNCE_COALESCE, one request at
  a time, deferred claims announced again after DEFER_WAITS, held while no scheduler answers;
  while the host asked in the last RIDE_RECENT, claims wait for its next schedule call to
  carry them (`lend`) as the outbox's own rule says (`ride_wait` by the piece's source,
  `ride_ends`), else go alone;
* the session (sched_session.py): a scheduler that goes away is noticed at once (a restart
  refuses connections), registration retried with the session's back-off, then every held
  piece re-announced; `recently_lost` and the longest silence as the session keeps them;
* each host's CPU: verifying and storing a piece costs `cpu_per_mib` seconds per MiB on one
  core per host, after the bytes arrive and before the piece counts as held.

The scheduler itself is given no CPU limit: decisions and announcements per second are what
the swarm demands of it, and the CPU its code took here (measured around every call into it,
plus its edge priced per call: bench/sim/cost.py) what that demand costs.
"""

from __future__ import annotations

import gc
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter, thread_time_ns

import scheduler.store
from bench.sim.core import Clock, Flow, Link, Network
from bench.sim.cost import EDGE_CALL_US, EDGE_PIECE_US, Bill, Cores
from common.models import (
    Announce,
    AnnounceReply,
    Decision,
    Heartbeat,
    ParentRef,
    PeerCounters,
    PeerLoad,
    PeerRegistration,
    Report,
    ScheduleRequest,
    TaskRequest,
)
from common.pieces import MiB, piece_count
from peer.engine.acquire import (
    LONG_POLL_MS,
    Acquisition,
    Ask,
    AwaitScheduler,
    Decided,
    Fetch,
    FromOrigin,
    GiveUp,
    NoDecision,
    OriginFailed,
    ParentsFailed,
    Pause,
    Paused,
    Step,
    Waited,
    bypass,
)
from peer.engine.ask_plan import AskPlan, spreads
from peer.engine.origin import LEASE_LAPSE, PROGRESS_EVERY
from peer.engine.reader import PLAN_WAIT, READAHEAD_BYTES, readahead_pieces, split_window
from peer.parents import Patience
from peer.sched_outbox import (
    ANNOUNCE_BATCH,
    ANNOUNCE_COALESCE,
    DEFER_WAITS,
    ORIGIN,
    announcements,
    ride_ends,
    ride_wait,
)
from peer.sched_session import RECENT_SECONDS, RETRY_MAX, RETRY_MIN
from peer.upload import per_address_default
from scheduler.state import ClusterState, StateError, UnknownPeer, UnknownTask
from scheduler.waiting import Parked, Parking, call_key, done, wakes

REGISTRY = "http://registry.sim:5000"
PROGRESS_WALL = 60.0  # a run with a wall limit reports progress this often (wall seconds)
COLLECT_EVENTS = 1 << 21  # clock events between the cyclic collector's passes (Swarm.run)
TASK = "sha256:" + "ab" * 32


def chunk_id(index: int) -> str:
    return f"blake3:{index:064x}"


@dataclass
class Params:
    """What the simulated peers and network are like (defaults: the lab's loopback veths)."""

    rtt: float = 0.0005  # a request and its answer, scheduler or parent
    fetch_overhead: float = 0.0  # a parent's GET before its first byte, beyond the rtt
    origin_overhead: float = 0.0  # an origin GET before its first byte, beyond the rtt
    cpu_per_mib: float = 0.002  # seconds of one core to verify and store a MiB
    # From the client's GET to the peer's first ask: the registry's access check (a HEAD)
    # and opening the task at the scheduler.
    start_delay: float = 0.0
    upload_slots: int = 8
    heartbeat_interval: float = 2.0
    lease_timeout: float = 2.0
    piece_size: int | None = None  # None: the default layout for the blob
    # An experiment, not the rules: an announcement wakes this many of the calls parked on
    # each of its pieces (0: every one; None: as many as each has room for, ClusterState.room,
    # as the memory store's Waiters).
    wake_limit: int | None = None
    readahead: int = READAHEAD_BYTES  # the reader's window (reader.py); another, an experiment
    # The scheduler edge's CPU per call and per piece in it (bench/sim/cost.py).
    edge_call_us: float = EDGE_CALL_US
    edge_piece_us: float = EDGE_PIECE_US
    sched_cores: int | None = None  # an experiment: the scheduler as this many cores (Cores)


@dataclass(eq=False, slots=True)
class Host:
    index: int
    id: str
    idc: str
    location: str
    up: Link
    down: Link
    start_at: float = 0.0
    corrupt: bool = False
    alive: bool = True
    # engine state
    have: set[int] = field(default_factory=set)
    workers: dict[int, Worker] = field(default_factory=dict)
    known: dict[int, tuple[str, list[ParentRef]]] = field(default_factory=dict)
    oruns: dict[int, OriginRun] = field(default_factory=dict)
    cpu_free: float = 0.0
    patience: Patience = field(default_factory=Patience)  # its parent clients' (parents.py)
    # reader
    plan: AskPlan = field(default_factory=lambda: AskPlan(0, 0))  # its asks (Swarm.planned)
    reading: bool = False
    planning: bool = False
    blocked_since: float | None = None
    done_at: float | None = None
    # uploads
    active: int = 0
    by_child: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    uploads: dict[Upload, None] = field(default_factory=dict)
    downloads: dict[Upload, None] = field(default_factory=dict)
    uploaded: int = 0
    from_origin: int = 0
    from_peers: int = 0
    # batcher
    unsent: dict[int, tuple[Worker, frozenset[str], float]] = field(default_factory=dict)
    flush_due: bool = False
    # outbox
    pending: dict[int, str] = field(default_factory=dict)
    progress: set[int] = field(default_factory=set)
    sealed: bool = False
    sending: bool = False
    send_at: float | None = None  # when the sender looks at what is queued next
    ride_due: float = 0.0  # when the first queued claim stops waiting for a schedule call
    asked: float | None = None  # when the host's last schedule call went out
    # session
    connected: bool = True
    lost_at: float | None = None
    silences: list[tuple[float, float]] = field(default_factory=list)
    back_waiters: list[Worker] = field(default_factory=list)
    reg: PeerRegistration | None = None


@dataclass(eq=False, slots=True)
class Upload:
    parent: Host
    child: Host
    worker: Worker
    flow: Flow | None = None


@dataclass(eq=False, slots=True)
class OriginRun:
    host: Host
    epoch: int | None
    first: int
    last: int
    begun: float
    waiters: dict[int, list[Worker]] = field(default_factory=lambda: defaultdict(list))
    failed: bool = False
    flow: Flow | None = None
    next: int = 0


@dataclass(eq=False, slots=True)
class Call:
    """A schedule call in flight or parked at the scheduler."""

    host: Host
    batch: dict[int, tuple[Worker, frozenset[str], float]]
    req: ScheduleRequest
    deadline: float = 0.0
    waking: bool = False  # a re-decision is scheduled
    done: bool = False
    session: int = 0
    arrived: float | None = None  # when it reached the scheduler (with finite cores)
    parked: Parked | None = None  # what it re-decides next, its answer so far
    timer_at: float = 0.0  # when its one live timer (recheck or deadline) fires
    ann: Announce | None = None  # the host's claims it carries (the outbox's `lend`)


class Worker:
    """One piece's acquisition on one host: the real `Acquisition`, its steps done here."""

    __slots__ = ("acq", "host", "index", "over", "sim", "step")

    def __init__(self, sim: Swarm, host: Host, index: int) -> None:
        self.sim, self.host, self.index = sim, host, index
        self.acq = Acquisition(sim.rng)
        self.over = False
        self.do(self.acq.start(sim.clock.now))

    def send(self, event: object) -> None:
        if self.over or not self.host.alive:
            return
        host = self.host
        waiting = host.blocked_since if host.reading and host.plan.pos == self.index else None
        self.do(self.acq.send(event, self.sim.clock.now, False, waiting))  # type: ignore[arg-type]

    def do(self, step: Step) -> None:
        sim, host = self.sim, self.host
        if host.planning and self.index == 0 and isinstance(step, Fetch | FromOrigin):
            sim.planned(host)
        match step:
            case Ask(exclude=exclude):
                sim.ask(host, self, exclude)
            case Fetch(chunk=chunk, parents=parents, report=report):
                if report:
                    host.known[self.index] = (chunk, list(parents))
                sim.fetch(self, list(parents), 0, set(), report)
            case Pause(seconds=seconds):
                sim.clock.after(seconds, self.send, Paused())
            case AwaitScheduler(seconds=seconds):
                sim.await_scheduler(self, seconds)
            case FromOrigin(epoch=epoch, first=first, last=last):
                sim.stats.origin_reasons[step.reason or "lease"] += 1
                if epoch is None:
                    sim.origin_piece(self, None, self.index, self.index)
                else:
                    assert first is not None and last is not None
                    sim.origin_piece(self, epoch, first, last)
            case GiveUp():
                self.over = True
                sim.stats.gave_up += 1


@dataclass(slots=True)
class Stats:
    asked: int = 0  # pieces asked in schedule calls sent (a piece asked again counts again)
    decisions: int = 0  # pieces decided by ClusterState.schedule, re-decisions included
    announced: int = 0  # pieces in announcements the scheduler took (re-announced included)
    calls: int = 0  # ClusterState.schedule calls
    announces: int = 0  # announce calls (progress and re-announcements included)
    rides: int = 0  # announcements carried by schedule calls
    heartbeats: int = 0
    reports: int = 0
    transfers: int = 0  # pieces moved, parent or origin
    corrupt_caught: int = 0
    gave_up: int = 0
    cross_idc: float = 0.0  # bytes
    # (The simulator's speed is counted in piece events, `piece_events`; bench/sim/__init__.py.)
    origin_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_second: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # decisions

    @property
    def piece_events(self) -> int:
        """A piece asked, decided, moved (parent or origin), announced or reported."""
        return self.asked + self.decisions + self.transfers + self.announced + self.reports


class Swarm:
    def __init__(self, *, length: int, params: Params, origin_rate: float, seed: int,
                 idc_links: dict[str, float] | None = None) -> None:
        self.p = params
        self.length = length
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.net = Network(self.clock)
        self.stats = Stats()
        self.bill = Bill(params.edge_call_us, params.edge_piece_us)
        self.cores = Cores(params.sched_cores) if params.sched_cores else None
        self._held: list[tuple[Call, list[Decision] | None]] | None = None  # answers of a turn
        self.hosts: list[Host] = []
        self.by_id: dict[str, Host] = {}
        self.origin = Link("origin", origin_rate)
        self.origin_idc = ""
        self.idc_out: dict[str, Link] = {}
        self.idc_in: dict[str, Link] = {}
        for idc, rate in (idc_links or {}).items():
            self.idc_out[idc] = Link(f"{idc}-out", rate)
            self.idc_in[idc] = Link(f"{idc}-in", rate)
        self.state = self._new_state()
        self.up = True
        self.session = 0  # scheduler incarnation: a restart ends every call in flight
        self.parked = Parking()  # the long polls, as `Waiters` keeps them for the one task
        self.calls: dict[Parked, Call] = {}
        self.meta = self.state.ensure_task(TaskRequest(task_id=TASK, length=length,
                                                       piece_size=params.piece_size), 0.0)
        self.piece_size = self.meta.piece_size
        self.count = piece_count(length, self.piece_size)
        self.chunks = [chunk_id(i) for i in range(self.count)]
        self.sizes = [self.size(i) for i in range(self.count)]  # looked up per transfer
        self.window = readahead_pieces(self.piece_size, params.readahead)
        self.per_address = per_address_default(params.upload_slots)
        self.origin_bytes = 0.0
        self.leases = 0  # granted by schedulers since restarted
        self.pulling = 0  # hosts alive and not done

    def _new_state(self) -> ClusterState:
        return ClusterState(heartbeat_interval=self.p.heartbeat_interval,
                            lease_timeout=self.p.lease_timeout,
                            rng=random.Random(self.rng.random()))

    def size(self, index: int) -> int:
        return min(self.piece_size, self.length - index * self.piece_size)

    # -- hosts -------------------------------------------------------------------------------

    def add_host(self, *, up: float, down: float, idc: str = "", location: str = "",
                 start_at: float = 0.0, corrupt: bool = False) -> Host:
        i = len(self.hosts)
        hid = f"h{i:05d}"
        host = Host(i, hid, idc, location, Link(f"{hid}-up", up), Link(f"{hid}-down", down),
                    start_at=start_at, corrupt=corrupt)
        host.reg = PeerRegistration(id=hid, upload_addr=f"10.{i >> 16}.{(i >> 8) & 255}."
                                    f"{i & 255}:65002", idc=idc, location=location,
                                    upload_slots=self.p.upload_slots, started_at=1.0)
        self.state.register(host.reg, 0.0)
        self.hosts.append(host)
        self.by_id[hid] = host
        self.pulling += 1
        self.clock.at(start_at + self.p.start_delay, self.start_pull, host)
        self.clock.at(self.rng.uniform(0, self.p.heartbeat_interval), self.heartbeat, host)
        return host

    def kill(self, host: Host) -> None:
        """The host is gone (power, kernel): its flows stop, its children notice by a stall."""
        if not host.alive:
            return
        host.alive = False
        if host.done_at is None:
            self._pulled()
        for up in list(host.uploads):
            self._end_upload(up)
            self._stall_check(up, self.clock.now)
        for run in list(host.oruns.values()):
            self._stop_run(run)
        for up in list(host.downloads):  # its own, from whoever was sending them
            self._end_upload(up)

    # -- the scheduler's side ----------------------------------------------------------------

    def _state_call(self, host: Host, fn, *args):
        """Run a ClusterState rule for `host`; None if the scheduler does not know it (a
        restart): the session registers again."""
        now = self.clock.now
        started = thread_time_ns()
        try:
            return fn(*args, now)
        except (UnknownPeer, UnknownTask):
            self._lose(host)
            return None
        finally:
            self.bill.rules(now, thread_time_ns() - started)

    def heartbeat(self, host: Host) -> None:
        if not host.alive:
            return
        if self.up and host.connected:
            self.stats.heartbeats += 1
            before = self._begin()
            self.bill.call(self.clock.now)
            hb = Heartbeat.model_construct(
                load=PeerLoad.model_construct(active_uploads=host.active, upload_rate=0.0,
                                              free_disk=0),
                counters=PeerCounters.model_construct(
                    origin=int(host.from_origin), peer=int(host.from_peers), local=0,
                    served=0, uploaded=int(host.uploaded), started_at=1.0))
            self._state_call(host, self.state.heartbeat, host.id, hb)
            self._served(before)  # a core's time; its answer is not waited for
        self.clock.after(self.p.heartbeat_interval, self.heartbeat, host)

    def expire_loop(self) -> None:
        if self.up:
            started = thread_time_ns()
            expired = self.state.expire(self.clock.now)
            self.bill.rules(self.clock.now, thread_time_ns() - started)
            if expired:
                self._notify(None)
        self.clock.after(1.0, self.expire_loop)

    def ask(self, host: Host, worker: Worker, exclude: frozenset[str]) -> None:
        host.unsent[worker.index] = (worker, exclude, self.clock.now)
        if not host.flush_due:
            host.flush_due = True
            self.clock.after(0.0, self._flush, host)

    def _flush(self, host: Host) -> None:
        host.flush_due = False
        batch, host.unsent = host.unsent, {}
        batch = {i: a for i, a in batch.items() if not a[0].over}
        if not batch or not host.alive:
            return
        if not host.connected:  # the session fails calls at once while no scheduler answers
            for i, (w, _, _) in batch.items():
                w.send(NoDecision(True, host.known.pop(i, None)))
            return
        exclude: set[str] = set()
        for _, ex, _ in batch.values():
            exclude |= ex
        req = ScheduleRequest.model_construct(
            peer_id=host.id, task_id=TASK, pieces=list(batch), exclude=sorted(exclude)[:256],
            wait_ms=LONG_POLL_MS, registry=REGISTRY)
        self.stats.asked += len(batch)
        call = Call(host, batch, req, session=self.session, ann=self._lend(host))
        self.clock.after(self.p.rtt / 2, self._arrive, call)

    def _arrive(self, call: Call) -> None:
        if not self.up or call.session != self.session:
            self._answer_later(call, None)
            return
        if self.cores is not None and call.arrived is None:
            call.arrived = self.clock.now
        if self._queued(self._arrive, call):
            return
        now = self.clock.now
        before = self._begin()
        ann, call.ann = call.ann, None
        self.bill.call(now, len(call.req.pieces) + (len(ann.pieces) if ann else 0))
        if ann is not None:  # `announce_and_schedule`: the claims first, then the call
            self.stats.rides += 1
            reply = self._state_call(call.host, self.state.announce, ann)
            if reply is not None:
                self.stats.announced += len(ann.pieces)
                self._notify(wakes(ann))
                self.clock.after(self.p.rtt / 2, self._announced_ride, call.host, ann, reply)
        call.deadline = now + LONG_POLL_MS / 1000
        started = thread_time_ns()  # the call parked and its first turn, timed as one
        call.parked = self.parked.take(call_key(call.req), call.req.pieces,
                                       scheduler.store.RECHECK_SECONDS, now)
        self._turn(call, now)
        self.bill.rules(now, thread_time_ns() - started)
        if self.cores is not None and call.arrived is not None:
            # From its arrival to its first turn's end: queued for a core, then served.
            self.cores.waits.append(now + self._served(before) - call.arrived)

    # -- the scheduler as finite cores (`Params.sched_cores`; without it all of this is idle)

    def _queued(self, fn, *args) -> bool:
        """Whether this work waits for a free core: fn(*args) then runs when one is."""
        if self.cores is None:
            return False
        now = self.clock.now
        t = self.cores.start(now)
        if t <= now:
            return False
        self.clock.at(t, fn, *args)
        return True

    def _begin(self) -> float:
        """Work starts on a core: its answers are held until what it cost is known."""
        if self.cores is not None:
            self._held = []
        return self.bill.total_ns

    def _served(self, before: float) -> float:
        """Work that began at `before` (the bill then) is done: the core is taken for what it
        cost, and its held answers leave once it ends. The delay, seconds."""
        if self.cores is None:
            return 0.0
        now = self.clock.now
        late = self.cores.ran(now, (self.bill.total_ns - before) / 1e9) - now
        held, self._held = self._held or [], None
        for call, decisions in held:
            self.clock.after(self.p.rtt / 2 + late, self._answered, call, decisions)
        return late

    def _decide(self, call: Call) -> None:
        """One turn of `Waiters.schedule`'s loop (scheduler/store.py), its CPU the scheduler's."""
        call.waking = False
        if call.done:
            return
        if self._queued(self._decide, call):
            call.waking = True  # on its way: a wake meanwhile adds nothing
            return
        now = self.clock.now
        before = self._begin()
        started = thread_time_ns()
        self._turn(call, now)
        self.bill.rules(now, thread_time_ns() - started)
        self._served(before)

    def _turn(self, call: Call, now: float) -> None:
        if not self.up or call.session != self.session:
            self._unpark(call)
            self._answer_later(call, None)
            return
        parked = call.parked
        assert parked is not None
        pieces = parked.begin(now)
        if pieces:
            try:
                decisions = self.state.schedule(
                    call.req, now, None if pieces is parked.pieces else pieces)
            except (UnknownPeer, UnknownTask):
                self._unpark(call)
                self._lose(call.host)
                self._answer_later(call, None)
                return
            except StateError:
                self._unpark(call)
                self._answer_later(call, None)
                return
            self.stats.calls += 1
            self.stats.decisions += len(decisions)
            self.stats.per_second[int(now)] += len(decisions)
            kinds = self.stats.kinds
            for d in decisions:
                kinds[d.reason if d.action == "wait" and d.reason else d.action] += 1
            answer = parked.decided(decisions)
        else:
            answer = parked.answer()
        if now >= call.deadline or done(answer):
            self._leave(call)
            self._answer_later(call, answer)
            return
        if parked not in self.calls:
            self.calls[parked] = call
            self.parked.park(parked)
        parked.idle()  # true: nothing happens while a decision is made here
        at = min(parked.recheck_at, call.deadline)
        if at != call.timer_at:  # one live timer a call, as `Waiters` waits
            call.timer_at = at
            self.clock.after(at - now, self._timer, call, at)

    def _timer(self, call: Call, at: float) -> None:
        if call.done or at != call.timer_at:
            return
        parked = call.parked
        assert parked is not None
        if at >= call.deadline:  # the long poll ends with its last answer
            self._leave(call)
            self._answer_later(call, parked.answer())
            return
        started = thread_time_ns()
        parked.changed_all()
        self.bill.rules(self.clock.now, thread_time_ns() - started)
        self._wake(call)

    def _wake(self, call: Call) -> None:
        if not call.waking and not call.done:
            call.waking = True
            self.clock.after(0.0, self._decide, call)

    def _leave(self, call: Call) -> None:  # (within a turn: its CPU is charged there)
        assert call.parked is not None
        self.calls.pop(call.parked, None)
        self.parked.leave(call.parked, call_key(call.req), self.clock.now)

    def _unpark(self, call: Call) -> None:
        if call.parked is not None and self.calls.pop(call.parked, None) is not None:
            self.parked.unpark(call.parked)

    def _answer_later(self, call: Call, decisions: list[Decision] | None) -> None:
        call.done = True
        if self._held is not None:  # sent once the core's work ends
            self._held.append((call, decisions))
            return
        self.clock.after(self.p.rtt / 2, self._answered, call, decisions)

    def _answered(self, call: Call, decisions: list[Decision] | None) -> None:
        host = call.host
        if not host.alive:
            return
        batch = call.batch
        if decisions is not None:
            now = self.clock.now
            for d in decisions:
                ask = batch.pop(d.piece, None)
                if ask is None or ask[0].over:
                    continue
                answer = bypass(d, False, now - ask[2])
                if answer is None:
                    host.unsent[d.piece] = ask
                    if not host.flush_due:
                        host.flush_due = True
                        self.clock.after(0.0, self._flush, host)
                else:
                    ask[0].send(Decided(answer))
        for i, (w, _, _) in batch.items():
            w.send(NoDecision(True, host.known.pop(i, None)))

    # -- announcements (the outbox) ----------------------------------------------------------

    def announce(self, host: Host, index: int | None = None, progress: int | None = None,
                 sealed: bool = False, source: str = ORIGIN) -> None:
        sooner = False
        if index is not None:
            due = self.clock.now + ride_wait(source)
            sooner = not host.pending or due < host.ride_due
            if sooner:
                host.ride_due = due
            host.pending[index] = self.chunks[index]
        if progress is not None:
            host.progress.add(progress)
        host.sealed |= sealed
        # As the outbox: a claim joining others that wait, no sooner, wakes nothing.
        if index is None or sooner or self._ride_ends(host) is None:
            self._send_soon(host)

    def _ride_ends(self, host: Host) -> float | None:
        """The outbox's `_ride_ends`: claims alone (no seal) wait for the next call."""
        if not host.pending or host.sealed:
            return None
        return ride_ends(host.ride_due, host.asked)

    def _lend(self, host: Host) -> Announce | None:
        """The outbox's `lend`: what is queued leaves with the schedule call going out."""
        host.asked = self.clock.now
        if host.sending or len(host.pending) > ANNOUNCE_BATCH \
                or not (host.pending or host.progress or host.sealed):
            return None
        [ann] = announcements(host.id, TASK, host.pending, host.sealed, host.progress,
                              REGISTRY)
        host.pending, host.progress, host.sealed = {}, set(), False
        return ann

    def _announced_ride(self, host: Host, ann: Announce, reply: AnnounceReply) -> None:
        if host.alive:
            self._deferred(host, ann, reply, 0)

    def _send_soon(self, host: Host, delay: float = ANNOUNCE_COALESCE) -> None:
        """The sender looks at what is queued after `delay` (a sooner look wins)."""
        if host.sending or not host.connected:
            return
        at = self.clock.now + delay
        if host.send_at is not None and host.send_at <= at:
            return
        host.send_at = at
        self.clock.after(delay, self._send, host, at)

    def _send(self, host: Host, at: float | None = None) -> None:
        if at is not None and host.send_at != at:
            return  # a sooner look took its place
        host.send_at = None
        if not host.alive or not host.connected or host.sending:
            return
        if not host.pending and not host.progress and not host.sealed:
            return
        ends = self._ride_ends(host)
        if ends is not None and self.clock.now < ends:  # waiting for the host's next call
            self._send_soon(host, ends - self.clock.now + ANNOUNCE_COALESCE)
            return
        anns = announcements(host.id, TASK, host.pending, host.sealed, host.progress,
                             REGISTRY)
        host.pending, host.progress, host.sealed = {}, set(), False
        host.sending = True
        self.clock.after(self.p.rtt / 2, self._announce_arrive, host, anns, 0, self.session)

    def _announce_arrive(self, host: Host, anns: list, attempt: int, session: int) -> None:
        if self._queued(self._announce_arrive, host, anns, attempt, session):
            return
        replies = []
        late = 0.0
        if self.up and session == self.session:
            before = self._begin()
            for ann in anns:
                self.stats.announces += 1
                self.bill.call(self.clock.now, len(ann.pieces))
                reply = self._state_call(host, self.state.announce, ann)
                if reply is None:
                    break
                self.stats.announced += len(ann.pieces)
                replies.append((ann, reply))
                self._notify(wakes(ann))
            late = self._served(before)
        self.clock.after(self.p.rtt / 2 + late, self._announced, host, replies, attempt)

    def _notify(self, pieces: frozenset[int] | None) -> None:
        """`Waiters.notify` (scheduler/store.py) with the same core, as the memory store
        calls it: of the calls parked on these pieces, as many of the longest parked woken
        as the rules say each piece has room for (`ClusterState.room`; the `wake_limit`
        experiment: of those not already woken, that many per piece, 0: every one); None:
        every call, in full."""
        if not pieces and pieces is not None:
            return
        now = self.clock.now
        started = thread_time_ns()
        if pieces is None:
            woken = self.parked.everyone()
        else:
            limit = self.state.room(TASK, pieces, now) \
                if self.p.wake_limit is None else self.p.wake_limit
            woken = self.parked.announced(pieces, limit)
        self.bill.rules(now, thread_time_ns() - started)
        calls = self.calls
        for parked in woken:
            self._wake(calls[parked])

    def _announced(self, host: Host, replies: list[tuple], attempt: int) -> None:
        host.sending = False
        if not host.alive:
            return
        for ann, reply in replies:
            self._deferred(host, ann, reply, attempt)
        if host.pending or host.progress or host.sealed:
            self._send_soon(host)

    def _deferred(self, host: Host, ann, reply: AnnounceReply, attempt: int) -> None:
        if not reply.deferred or attempt >= len(DEFER_WAITS):
            return
        chunks = {c.index: c.chunk for c in ann.pieces}
        again = {i: chunks[i] for i in reply.deferred if i in chunks and i in host.have}
        if again:
            anns = announcements(host.id, TASK, again, False, set(), REGISTRY)
            self.clock.after(DEFER_WAITS[attempt], self._announce_arrive_later, host, anns,
                             attempt + 1)

    def _announce_arrive_later(self, host: Host, anns: list, attempt: int) -> None:
        if host.alive and host.connected:
            self.clock.after(self.p.rtt / 2, self._announce_arrive, host, anns, attempt,
                             self.session)

    def report(self, host: Host, parent: str, index: int, kind: str) -> None:
        if host.connected and self.up:
            self.stats.reports += 1
            before = self._begin()
            self.bill.call(self.clock.now)
            self._state_call(host, self.state.report,
                             Report(peer_id=host.id, parent_id=parent, task_id=TASK,
                                    piece=index, kind=kind))
            self._served(before)

    # -- the session: outages and restarts ---------------------------------------------------

    def outage(self, duration: float, restart: bool) -> None:
        """The scheduler goes away for `duration` (a restart: with its state)."""
        self.up = False
        self.session += 1
        self._notify(None)  # every call in flight ends
        if restart:
            self.leases += self.state.back_to_source
            self.state = self._new_state()
        for host in self.hosts:
            self._lose(host)
        self.clock.after(duration, self._back)

    def _back(self) -> None:
        self.up = True

    def _lose(self, host: Host) -> None:
        if not host.connected or not host.alive:
            return
        host.connected = False
        host.lost_at = self.clock.now
        self.clock.after(RETRY_MIN, self._register, host, RETRY_MIN)

    def _register(self, host: Host, backoff: float) -> None:
        if not host.alive or host.connected:
            return
        if not self.up:
            nxt = min(backoff * 2, RETRY_MAX)
            self.clock.after(nxt, self._register, host, nxt)
            return
        now = self.clock.now
        assert host.reg is not None
        self.bill.call(now)  # register and the task's open: two calls
        self.bill.call(now)
        started = thread_time_ns()
        self.state.register(host.reg, now)
        self.state.ensure_task(TaskRequest(task_id=TASK, length=self.length,
                                           piece_size=self.piece_size), now)
        self.bill.rules(now, thread_time_ns() - started)
        host.silences.append((host.lost_at or now, now))
        # The whole store again (sched_reannounce.py), before calls go on (`connected`).
        anns = announcements(host.id, TASK, {i: self.chunks[i] for i in sorted(host.have)},
                             len(host.have) == self.count, set(), REGISTRY) if host.have else []
        self.clock.after(self.p.rtt / 2, self._reannounce, host, anns, self.session)

    def _reannounce(self, host: Host, anns: list, session: int) -> None:
        if self.up and session == self.session:
            for ann in anns:
                self.stats.announces += 1
                self.bill.call(self.clock.now, len(ann.pieces))
                if self._state_call(host, self.state.announce, ann) is None:
                    return
                self.stats.announced += len(ann.pieces)
                self._notify(wakes(ann))
        self.clock.after(self.p.rtt / 2, self._connected, host, session)

    def _connected(self, host: Host, session: int) -> None:
        if not host.alive or session != self.session or not self.up:
            if host.alive and not host.connected:
                self.clock.after(RETRY_MIN, self._register, host, RETRY_MIN)
            return
        host.connected = True
        self._send_soon(host)
        waiters, host.back_waiters = host.back_waiters, []
        for w in waiters:
            w.send(Waited(True, False))

    def recently_lost(self, host: Host) -> bool:
        return not host.connected and host.lost_at is not None \
            and self.clock.now - host.lost_at <= RECENT_SECONDS

    def longest_silence(self, host: Host, since: float) -> float:
        now = self.clock.now
        spans = list(host.silences)
        if not host.connected and host.lost_at is not None:
            spans.append((host.lost_at, now))
        return max((min(b, now) - max(a, since) for a, b in spans if b > since), default=0.0)

    def await_scheduler(self, worker: Worker, seconds: float) -> None:
        host = worker.host
        if host.connected:
            worker.send(Waited(True, False))
            return
        if not self.recently_lost(host):
            worker.send(Waited(False, False))
            return
        host.back_waiters.append(worker)
        self.clock.after(seconds, self._await_timeout, worker)

    def _await_timeout(self, worker: Worker) -> None:
        host = worker.host
        if worker in host.back_waiters:
            host.back_waiters.remove(worker)
            worker.send(Waited(False, self.recently_lost(host)))

    # -- the network -------------------------------------------------------------------------

    def links(self, src_up: Link, src_idc: str, dst: Host) -> tuple[Link, ...]:
        if src_idc != dst.idc and self.idc_out:
            return (src_up, self.idc_out[src_idc], self.idc_in[dst.idc], dst.down)
        return (src_up, dst.down)

    # -- parents -----------------------------------------------------------------------------

    def fetch(self, worker: Worker, parents: list[ParentRef], k: int, failed: set[str],
              report: bool) -> None:
        """Parents in turn (fetch.py): the verified piece, or ParentsFailed."""
        host = worker.host
        if worker.over or not host.alive:
            return
        while k < len(parents):
            ref = parents[k]
            k += 1
            parent = self.by_id.get(ref.id)
            if parent is None or parent is host:
                continue
            if not parent.alive:
                failed.add(ref.id)
                if report:
                    self.report(host, ref.id, worker.index, "failed")
                self.clock.after(host.patience.seconds(self.clock.now), self.fetch, worker,
                                 parents, k, failed, report)  # the dial's timeout
                return
            if parent.active >= self.p.upload_slots \
                    or parent.by_child[host.index] >= self.per_address:
                continue  # busy: 503 at once, no blame (its round trip is negligible)
            up = Upload(parent, host, worker)
            parent.active += 1
            parent.by_child[host.index] += 1
            parent.uploads[up] = None
            host.downloads[up] = None
            self.clock.after(self.p.rtt + self.p.fetch_overhead, self._begin_upload, up,
                             parents, k, failed, report)
            return
        worker.send(ParentsFailed(frozenset(failed)))

    def _begin_upload(self, up: Upload, parents: list[ParentRef], k: int, failed: set[str],
                      report: bool) -> None:
        if up not in up.parent.uploads:
            return
        size = self.sizes[up.worker.index]
        links = self.links(up.parent.up, up.parent.idc, up.child)
        up.flow = self.net.start(links, size, lambda: self._uploaded(up, parents, k, failed,
                                                                     report))

    def _end_upload(self, up: Upload) -> None:
        parent = up.parent
        if up in parent.uploads:
            del parent.uploads[up]
            del up.child.downloads[up]
            parent.active -= 1
            parent.by_child[up.child.index] -= 1
        if up.flow is not None:
            self.net.cancel(up.flow)
            # Its callback holds `up`: without the cycle, refcounting frees a finished
            # transfer at once (the collector's passes over them were ~10 % of a big run).
            up.flow = None

    def _stall_check(self, up: Upload, since: float) -> None:
        """The child's check of a parent silent since `since` (p2p/client.py `_check`):
        `slow` once silent for its patience, which its other parents' bytes keep short."""
        wait = since + up.child.patience.seconds(self.clock.now) - self.clock.now
        if wait > 1e-9:
            self.clock.after(wait, self._stall_check, up, since)
        else:
            self._upload_failed(up, "slow")

    def _upload_failed(self, up: Upload, kind: str) -> None:
        worker = up.worker
        if worker.over or not worker.host.alive:
            return
        self.report(worker.host, up.parent.id, worker.index, kind)
        worker.send(ParentsFailed(frozenset({up.parent.id})))

    def _uploaded(self, up: Upload, parents: list[ParentRef], k: int, failed: set[str],
                  report: bool) -> None:
        self._end_upload(up)
        parent, host, worker = up.parent, up.child, up.worker
        size = self.sizes[worker.index]
        host.patience.received(size, self.clock.now)
        parent.uploaded += size
        self.stats.transfers += 1
        if parent.idc != host.idc:
            self.stats.cross_idc += size
        if parent.corrupt:
            self.stats.corrupt_caught += 1
            failed.add(parent.id)
            self.report(host, parent.id, worker.index, "corrupt")
            self._cpu(host, size, self.fetch, worker, parents, k, failed, report)
            return
        host.from_peers += size
        self._cpu(host, size, self._kept, host, worker.index, None, "peer")

    def _cpu(self, host: Host, size: int, fn, *args) -> None:
        """`fn(*args)` once the host's core has verified (and stored) `size` bytes."""
        t = max(self.clock.now, host.cpu_free) + self.p.cpu_per_mib * size / MiB
        host.cpu_free = t
        self.clock.at(t, fn, *args)

    # -- the origin --------------------------------------------------------------------------

    def origin_piece(self, worker: Worker, epoch: int | None, first: int, last: int) -> None:
        host, index = worker.host, worker.index
        run = host.oruns.get(epoch) if epoch is not None else None
        if run is not None and not run.failed and run.first <= index <= run.last \
                and index >= run.next:
            run.waiters[index].append(worker)
            return
        missing = [i for i in range(first, last + 1) if i not in host.have or i == index]
        run = OriginRun(host, epoch, min(missing), max(missing), self.clock.now)
        run.next = run.first
        run.waiters[index].append(worker)
        if epoch is not None:
            host.oruns[epoch] = run
            self.clock.after(PROGRESS_EVERY, self._progress, run)
        self.clock.after(self.p.rtt + self.p.origin_overhead, self._origin_next, run)

    def _progress(self, run: OriginRun) -> None:
        host = run.host
        if run.failed or not host.alive or host.oruns.get(run.epoch) is not run:
            return
        self.announce(host, progress=run.epoch)
        self.clock.after(PROGRESS_EVERY, self._progress, run)

    def _origin_next(self, run: OriginRun) -> None:
        host = run.host
        if run.failed or not host.alive:
            return
        if run.next > run.last:
            self._stop_run(run)
            return
        if run.epoch is not None and self.longest_silence(host, run.begun) > LEASE_LAPSE:
            self._stop_run(run, lapsed=True)
            return
        i = run.next
        links = self.links(self.origin, self.origin_idc, host)
        run.flow = self.net.start(links, self.sizes[i], lambda: self._origin_got(run, i))

    def _origin_got(self, run: OriginRun, i: int) -> None:
        host = run.host
        size = self.sizes[i]
        self.origin_bytes += size
        self.stats.transfers += 1
        if host.idc != self.origin_idc:
            self.stats.cross_idc += size
        host.from_origin += size
        run.next = i + 1
        run.flow = None
        waiters = run.waiters.pop(i, [])
        if i not in host.have:
            self._cpu(host, size, self._kept, host, i, waiters)
        else:
            for w in waiters:
                self._finish(w)
        self._origin_next(run)

    def _stop_run(self, run: OriginRun, lapsed: bool = False) -> None:
        run.failed = True
        if run.flow is not None:
            self.net.cancel(run.flow)
            run.flow = None
        host = run.host
        if run.epoch is not None and host.oruns.get(run.epoch) is run:
            del host.oruns[run.epoch]
        for ws in run.waiters.values():
            for w in ws:
                w.send(OriginFailed(lapsed=lapsed))
        run.waiters.clear()

    # -- keeping pieces, and the reader ------------------------------------------------------

    def _kept(self, host: Host, index: int, waiters: list[Worker] | None = None,
              source: str = ORIGIN) -> None:
        if not host.alive:
            return
        if index not in host.have:
            host.have.add(index)
            host.known.pop(index, None)  # parents kept for a scheduler outage: held now
            host.plan.arrived(index, self.size(index))
            self.announce(host, index, sealed=len(host.have) == self.count, source=source)
        w = host.workers.get(index)
        if w is not None:
            self._finish(w)
        for w in waiters or ():
            self._finish(w)
        self._read(host)

    def _finish(self, worker: Worker) -> None:
        worker.over = True
        host = worker.host
        if host.workers.get(worker.index) is worker:
            del host.workers[worker.index]

    def _pulled(self) -> None:
        """A host is done or dead: the clock halts once none is pulling."""
        self.pulling -= 1
        if self.pulling <= 0:
            self.clock.halted = True

    def ensure(self, host: Host, index: int) -> bool:
        """Start obtaining a piece unless it is kept or on its way: whether this started it."""
        if index in host.have or index in host.workers:
            return False
        host.workers[index] = Worker(self, host, index)
        return True

    def start_pull(self, host: Host) -> None:
        """The mirror's `plan` (reader.py): the first piece alone, its decision awaited (up
        to PLAN_WAIT), then the read with its window."""
        if host.alive and self.count:
            host.planning = True
            self.ensure(host, 0)
            self.clock.after(PLAN_WAIT, self.planned, host)

    def planned(self, host: Host) -> None:
        if host.planning and host.alive:
            host.planning = False
            host.reading = True
            host.plan = AskPlan(self.count, *split_window(self.window, True), self.rng.randrange,
                                spread=spreads(True, host.idc), piece_size=self.piece_size,
                                since=self.clock.now)
            self._read(host)

    def _read(self, host: Host) -> None:
        """The reader (a whole-blob read) as ask_plan.py says: in order, refilled half a window
        at a time, pieces taken in order; its spread share (once fast) topped up with each
        refill, its far share (if any) as pieces arrive."""
        if not host.reading:
            return
        plan = host.plan
        k = plan.pos
        while True:
            if k >= self.count:
                host.reading = False
                host.done_at = self.clock.now
                self._pulled()
                return
            for j in plan.reached(k):
                self.ensure(host, j)
            if k not in host.have:
                if host.blocked_since is None:
                    host.blocked_since = self.clock.now
                break
            host.blocked_since = None
            k += 1
        plan.top_up(lambda j: self.ensure(host, j), self.clock.now)

    # -- running -----------------------------------------------------------------------------

    def run(self, until: float = 3600.0, wall_limit: float | None = None,
            progress: Callable[[], None] | None = None) -> bool:
        """Until every host is done (or simulated `until`); with `wall_limit`, at most that
        many seconds of wall time, calling `progress` every PROGRESS_WALL of them. False:
        cut short at the wall limit."""
        clock = self.clock
        clock.at(1.0, self.expire_loop)
        # The cyclic collector's passes scanned the swarm's objects again and again (21 % of
        # the wall of kraken at 400 hosts, 10-13 % at 2,600 even with full passes rare), while
        # a run makes no cycles (a finished transfer's flow and callback are freed by
        # refcounting): it is off, and every COLLECT_EVENTS events one pass collects what is
        # new since the last (a bound, should a path make cycles) and freezes the rest.
        enabled = gc.isenabled()
        gc.disable()
        gc.freeze()
        try:
            return self._run(until, wall_limit, progress)
        finally:
            gc.unfreeze()
            if enabled:
                gc.enable()

    def _run(self, until: float, wall_limit: float | None,
             progress: Callable[[], None] | None) -> bool:
        clock = self.clock
        started = perf_counter()
        report = [started + PROGRESS_WALL]
        cut = [False]

        def stop() -> bool:  # asked every STOP_EVERY events (the clock halts once all pulled)
            if not clock.events % COLLECT_EVENTS:
                gc.collect()
                gc.freeze()
            if wall_limit is None:
                return False
            t = perf_counter()
            if progress is not None and t >= report[0]:
                report[0] = t + PROGRESS_WALL
                progress()
            cut[0] = t - started >= wall_limit
            return cut[0]
        clock.halted = self.pulling <= 0
        clock.run(until, stop)
        return not cut[0]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]
