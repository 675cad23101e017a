"""A swarm simulator that runs the real rules (issue 15): `python -m bench.sim --scenario NAME`.

A discrete-event simulation in simulated seconds. The scheduler is the real
`scheduler.state.ClusterState` (with `scheduler.policy`), every peer's piece acquisition the
real `peer.engine.acquire.Acquisition`, imported and called as the server and the engine call
them: a rule changed there shows up here at once. Around them, bench/sim/swarm.py models what
the engine's I/O does (reader, batcher, parents, origin runs, outbox, session; its docstring
lists each) and bench/sim/core.py the network: hosts with an uplink and a downlink, an origin
with its own uplink, optional per-IDC links, flows sharing links max-min fairly.

Scenarios (bench/sim/scenarios.py): kraken, idc3, flash, base, die1, restart, lab8, lab16;
`--hosts N` or `--scale S` (hosts and blob times S) for a quick look, `--seed` for another
draw (a run is deterministic for a seed).

**The fluid bound** (the same as the lab's, bench/swarm/report.py): with blob size F, N hosts,
origin uplink u_s, host uplinks u_i and downlinks d_i, no schedule finishes every copy before

    T = max(F / u_s, F / min d_i, N·F / (u_s + Σ u_i))

— the origin must send every byte at least once, the slowest downlink must take the whole
blob, and the N·F bytes delivered must all leave some uplink. With IDCs, each IDC without the
origin must also take the blob in over its link from the others: T ≥ F / c_idc. Lab scenarios
take the bound at the nominal shaped rates, as the lab does, while the simulated links carry
1448/1514 of them (htb counts headers). Completion times are reported as multiples of T, origin
egress and bytes across IDCs as multiples of F.

**What a run reports**: p50/p99/max of the surviving hosts' completion times (each from its own
start), origin egress, the busiest uploader's share of all peer uploads, the scheduler demand
(decisions — pieces decided by `ClusterState.schedule`, long-poll re-decisions included — schedule
calls, announcements and heartbeats per simulated second of the pull), bytes across IDCs, and
the simulation's own speed. The last line is

    sim scenario=NAME hosts=H p50=…x p99=…x origin=…x decisions=…/s cpu=…us/piece replicas=…
        events=…/s

where decisions/s is per simulated second (what the scheduler must sustain); cpu is the
scheduler's CPU per piece moved and replicas the scheduler processes (one core each) the pull's
real-time demand needs, both this machine's: the rules' CPU measured as they run, the edge's
priced per call (bench/sim/cost.py); and events/s is
the simulator's speed: **piece events** per second of wall time, where a piece event is one
piece asked (each piece of a schedule call sent; asked again, counted again), decided (each
piece `ClusterState.schedule` decided, a long poll's re-decisions included), moved (a piece's
bytes delivered whole by a parent or the origin, corrupt ones included), announced (each piece
of an announcement the scheduler took, re-announcements included) or reported (a failed or
corrupt parent). The line above it gives each count, and the clock's own events (every timer,
message and flow finish it ran: the simulator's unit of work, not what the issue counts).

`--report` adds where the time went (bench/sim/report.py): each pulling host's downlink use
and, for what is unused, what it was doing (flows below the link rate, parked at the scheduler
by answer, backing off, asking); the start and the tail; the links' use over the pull.
"""
