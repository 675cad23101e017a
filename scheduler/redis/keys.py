"""Key names, hash-tagged for a Redis Cluster: a task's keys share the task's slot, a peer's
keys the peer's, and what is shared by every call (the peers index, the byte totals) is split
into `SHARDS` keys of their own slots, so no key is written by every call. On one Redis the
tags are only part of the names."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable

from redis.crc import key_slot

SHARDS = 16  # peers-index and counter shards: spread over the masters, a fixed cost to sum


def shard_of(name: str) -> int:
    return zlib.crc32(name.encode()) % SHARDS


def cluster_slot(key: str) -> int:
    return key_slot(key.encode())


def one_slot(key: str) -> int:
    """One Redis: every key in one group, so a call's writes stay one transaction."""
    return 0


SlotOf = Callable[[str], int]
GroupOf = Callable[[str], Hashable]  # which keys' scripts may share a run (a node's)


class Keys:
    def __init__(self, prefix: str = "naiad:") -> None:
        self.p = prefix

    # A task's slot: its record, chunk ids, holders, children and held counts, fenced
    # together. A piece's holders (one field of `holders`, changed by announcements) and its
    # children in flight (a hash of its own, one field per child, changed by every hand-out)
    # are apart, so a decision writes only the child it admitted.
    def task(self, tid: str) -> str:
        return f"{self.p}task:{{{tid}}}"

    def chunk(self, tid: str) -> str:
        return f"{self.p}chunk:{{{tid}}}"

    def holders(self, tid: str) -> str:
        return f"{self.p}holders:{{{tid}}}"

    def children(self, tid: str, index: int) -> str:
        return f"{self.p}children:{{{tid}}}:{index}"

    def holders_seq(self, tid: str) -> str:
        """Per piece, the task version at which this layout last wrote its holders field: a
        replica that decoded the field at that version does not read it again (READ_LUA's
        `HOLDERS`)."""
        return f"{self.p}hseq:{{{tid}}}"

    def held(self, tid: str) -> str:
        return f"{self.p}held:{{{tid}}}"

    # A peer's slot: its record (expiring), the tasks it announced, its cordon (which outlives
    # the record: a cordoned peer that comes back stays cordoned).
    def peer(self, pid: str) -> str:
        return f"{self.p}peer:{{{pid}}}"

    def peer_tasks(self, pid: str) -> str:
        return f"{self.p}peertasks:{{{pid}}}"

    def cordon(self, pid: str) -> str:
        return f"{self.p}cordon:{{{pid}}}"

    # Shards: a zset of peer id -> when its record expires (ms, that shard's Redis clock), and
    # a hash of byte totals with each peer's last report (`last:<peer>`) beside them, so a
    # report is fenced and counted in one slot.
    def index(self, pid: str) -> str:
        return self.index_shard(shard_of(pid))

    def index_shard(self, n: int) -> str:
        return f"{self.p}peers:{{s{n}}}"

    def counters(self, name: str) -> str:
        return self.counter_shard(shard_of(name))

    def counter_shard(self, n: int) -> str:
        return f"{self.p}counters:{{s{n}}}"

    @property
    def tasks(self) -> str:
        return f"{self.p}tasks"

    @property
    def history(self) -> str:
        return f"{self.p}history"


def last_field(pid: str) -> str:
    return f"last:{pid}"


B2S = "back_to_source"  # a counter shard's field: pieces sent back to the origin
