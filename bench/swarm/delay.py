"""Delay every packet of one NFQUEUE queue by a uniform random 40-60 ms (what `tc qdisc ... netem
delay 50ms 10ms` does, reordering included): the lab's stand-in for netem on a kernel built
without sch_netem. Run inside a host's namespace, where an iptables rule sends eth0's egress to
the queue (`-j NFQUEUE --queue-bypass`: packets pass undelayed while no one listens):

    python -m bench.swarm.delay --queue 0 --ms 50 --jitter 10

Speaks nfnetlink_queue over a raw netlink socket (no library): bind the queue, ask for metadata
only (the verdict needs just the packet id) and whole GSO packets (a 64 KiB TCP burst is one
verdict, as it is one skb to netem), then accept each packet when its time comes. Prints
`ready` once bound, so the lab installs the rule only after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1, 4
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(msg: int, queue: int, attrs: bytes, seq: int = 0, flags: int = NLM_F_REQUEST) -> bytes:
    """One nfnetlink message to the queue subsystem: nlmsghdr, nfgenmsg (AF_UNSPEC, v0, queue
    number big-endian), attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq,
                       0) + body


def bind_messages(queue: int, maxlen: int) -> list[bytes]:
    flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
    return [
        message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack(
            "=BBH", NFQNL_CFG_CMD_BIND, 0, 0)), seq=1, flags=NLM_F_REQUEST | NLM_F_ACK),
        message(NFQNL_MSG_CONFIG, queue,
                _attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))
                + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", maxlen))
                + _attr(NFQA_CFG_MASK, struct.pack(">I", flags))
                + _attr(NFQA_CFG_FLAGS, struct.pack(">I", flags)),
                seq=2, flags=NLM_F_REQUEST | NLM_F_ACK),
    ]


def verdict(queue: int, packet_id: int) -> bytes:
    return message(NFQNL_MSG_VERDICT, queue,
                   _attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet_id)))


def packet_ids(data: bytes) -> tuple[list[int], list[int]]:
    """The packet ids of the queued packets in one datagram from the kernel, and the error codes
    of any netlink errors (acks carry 0)."""
    ids: list[int] = []
    errors: list[int] = []
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind == NLMSG_ERROR:
            errors.append(-struct.unpack_from("=i", data, off + 16)[0])
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + 20  # past nlmsghdr and nfgenmsg
            while a + 4 <= off + length:
                alen, akind = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from(">I", data, a + 4)[0])
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids, errors


async def serve(queue: int, delay: float, jitter: float, maxlen: int) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: no ENOBUFS in a burst
    sock.bind((0, 0))
    for m in bind_messages(queue, maxlen):
        sock.send(m)
        _, errors = packet_ids(sock.recv(65536))
        if any(errors):
            raise OSError(errors[0], f"binding NFQUEUE {queue}")
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)

    def release(packet_id: int) -> None:
        sock.send(verdict(queue, packet_id))

    while True:
        data = await loop.sock_recv(sock, 1 << 20)
        ids, _ = packet_ids(data)
        for packet_id in ids:
            loop.call_later(random.uniform(delay - jitter, delay + jitter), release, packet_id)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.swarm.delay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--ms", type=float, default=50.0, help="mean delay, ms (default 50)")
    ap.add_argument("--jitter", type=float, default=10.0, help="± uniform, ms (default 10)")
    ap.add_argument("--maxlen", type=int, default=65536, help="packets the kernel may queue")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.queue, args.ms / 1e3, args.jitter / 1e3, args.maxlen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
