"""The swarm lab's fault machinery that needs no namespaces: the stall measure, the choice of
whom to cut and partition, the scheduler-only rules, and the NFQUEUE wire format."""

from __future__ import annotations

import struct

from bench.swarm import delay
from bench.swarm.clients import Stalls
from bench.swarm.faults import most_pieces, partitioned, scheduler_rules
from bench.swarm.topology import Host


def test_stall_is_the_longest_gap_between_growths_including_the_first_byte() -> None:
    s = Stalls(["a", "b"])
    for t, a, b in [(0.1, 0, 10), (0.5, 5, 10), (0.6, 5, 10), (3.6, 9, 20), (3.7, 10, 20)]:
        s.observe(t, "a", a)
        s.observe(t, "b", b)
    assert s.worst["a"] == 3.1  # 0.5 -> 3.6 with no new byte
    assert round(s.worst["b"], 2) == 3.5  # 0.1 -> 3.6
    s2 = Stalls(["c"])
    s2.observe(2.0, "c", 1)
    assert s2.worst["c"] == 2.0  # waiting for the first byte is a stall too


def test_the_cut_goes_to_the_top_holder_and_half_the_peers_are_partitioned() -> None:
    assert most_pieces({"p0": 3, "p1": 7, "p2": 7}) == "p1"
    assert most_pieces({}) is None
    hosts = [Host(f"p{k}", f"10.77.1.{k + 1}", 1) for k in range(8)]
    assert [h.name for h in partitioned(hosts)] == ["p0", "p2", "p4", "p6"]


def test_the_partition_drops_only_scheduler_ports() -> None:
    at_scheduler, at_peer = scheduler_rules("10.77.1.1", "10.77.0.1")
    assert at_scheduler[0][3:9] == ["-s", "10.77.1.1", "-p", "tcp", "--dport", "8002"]
    assert at_scheduler[1][3:9] == ["-s", "10.77.1.1", "-p", "udp", "--dport", "8003"]
    assert all("--sport" in r and "10.77.0.1" in r for r in at_peer)


def test_packet_ids_are_read_from_a_queue_message_and_errors_from_acks() -> None:
    hdr = delay._attr(delay.NFQA_PACKET_HDR, struct.pack(">IHB", 4242, 0x0800, 3))
    packet = delay.message(delay.NFQNL_MSG_PACKET, 0, hdr)
    ack = struct.pack("=IHHII", 36, delay.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
    ids, errors = delay.packet_ids(packet + ack)
    assert ids == [4242]
    assert errors == [1]
    verdict = delay.verdict(0, 4242)
    assert struct.unpack_from(">II", verdict, 24) == (delay.NF_ACCEPT, 4242)
