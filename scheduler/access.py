"""Registry access answers shared cluster-wide (issue 14): one registry HEAD per layer, per
credential, per minute for the whole cluster instead of one per peer.

Before a peer serves a blob it asks the registry (HEAD, the client's Authorization) whether
this client may read this digest in this repository (peer/mirror.py `AccessCache`). Every peer
asking for itself costs the registry one HEAD per peer per credential per minute: Harbor was
overloaded that way under Dragonfly (#3783). Here the peers share the registry's answers
through the scheduler, without widening what any client can read:

- **The key is the evidence, hashed under the cluster secret.** A peer names an answer by
  HMAC-SHA256(cluster secret, credential, registry, scope), the same three things its own cache
  is keyed by (the scope: repository@digest, or a `/download` URL with its signature). The
  scheduler (and Redis) hold only these HMACs: never a credential, repository or URL, and
  without the secret not even a guessable credential can be tested against them. Only a client
  with the same Authorization, at the same registry, for the same repository and digest, can
  meet a shared answer: a blob readable in repository A is not thereby readable in B, one
  credential's yes is never another's, an anonymous yes is never an authenticated client's
  nor the reverse. Without a cluster secret nothing is shared (anyone could publish a yes).
- **Only a registry's own answer is published, and only members publish.** The routes are
  internal (signed with the secret). A yes is a 2xx with the blob's length; a refusal (401,
  403, 404, any 4xx) is shared as a refusal, never as a yes, and hides any yes under the same
  key while it lives: a peer that sees a credential refused tells the others at once. What a
  refusal makes a peer do is pass the client's request to the registry itself, so the client
  gets the registry's own answer, body and `WWW-Authenticate` included; nothing can leak that
  way. A 5xx, or a 2xx without a length, is not shared: it only hands the claim back. Two yeses
  that disagree on the length (another registry behind the same name, a bad peer) drop the
  shared yes, so every peer asks for itself.
- **Revocation is bounded as before.** An answer lives `ACCESS_TTL_MS` (60 s) at most from the
  moment the registry gave it: the publisher sends how long it still trusts its answer, the
  scheduler caps it and keeps it that long (a Redis key with that TTL), and a peer that takes a
  shared answer keeps it only for what remains of it, counted from when it asked. A token
  revoked at the registry can read through naiad for at most 60 s after the last yes (plus one
  scheduler call's latency), exactly the bound of each peer's own cache today.
- **One asker at a time.** Asked for a key it has no answer for, the scheduler gives the first
  caller the claim (`CLAIM_SECONDS`) and parks the others until the answer is published or
  their wait runs out; then they ask the registry themselves (a claimer that died costs its
  waiters at most their wait). Without this, a hundred peers opening one layer at once would
  still send a hundred HEADs. With it the registry sees one HEAD per key per `ACCESS_TTL_MS`
  cluster-wide while the layer is being read, plus one per peer whose wait ran out.
- **The scheduler is advice for access, never a dependency.** A peer that cannot reach it
  (down, slow, refusing) asks the registry as it always did, and keeps its own answer.

What is trusted: a member holding the cluster secret may publish a yes, so a compromised member
could open a blob to other peers' clients that the registry would refuse them; it could already
serve its own clients anything and forge the two confirmations that seal a map (peer ids are not
authenticated beyond the secret). A cluster in which one name reaches different registries from
different peers (split-horizon DNS) must not share one secret across them: answers, like piece
maps, are bound to the registry by its URL. A model hub's metadata check (`peer/hub.py`) is not
shared: its answer carries headers the client needs.

This module: the rules as pure functions (`shared`, `kind`), the `AccessBook` seam (what a
store must do) with `MemoryBook` and `RedisBook` (keys hash-tagged per answer, so the same calls
work on Redis Cluster: no call spans slots), and `AccessService`, the long-polling lookup and
the publish the routes (scheduler/access_api.py) call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from common.models import ACCESS_TTL_MS, AccessAnswer, AccessQuery, AccessReply

CLAIM_SECONDS = 5.0  # how long one peer's pending question keeps the others waiting
# Waiting calls look again this often for answers published on another replica (through
# Redis); on one replica they are woken at once.
REDIS_POLL = 0.05
MEMORY_MAX = 100_000  # keys kept in one process, expired ones dropped first


@dataclass(frozen=True, slots=True)
class Answer:
    """A registry's answer as shared: its status, the blob's length for a yes, and how many
    seconds it may still be trusted."""

    status: int
    length: int | None
    ttl: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.length is not None


def kind(status: int, length: int | None) -> Literal["yes", "no"] | None:
    """What a registry's answer is worth to others: a yes (2xx and a length), a refusal (4xx),
    or nothing (a 5xx, a 2xx without a length, a stray 1xx/3xx)."""
    if 200 <= status < 300:
        return "yes" if length is not None else None
    if 400 <= status < 500:
        return "no"
    return None


def shared(refusal: Answer | None, yes: Answer | None) -> Answer | None:
    """The answer other peers get: a live refusal hides any yes."""
    return refusal or yes


def capped(ttl_ms: int) -> float:
    return min(ttl_ms, ACCESS_TTL_MS) / 1000


class AccessBook(Protocol):
    """Where answers and claims live: one process (`MemoryBook`) or Redis (`RedisBook`).
    `poll`: how often a waiting lookup must look again for changes made elsewhere."""

    poll: float

    async def read(self, key: str) -> tuple[Answer | None, Answer | None]:
        """The live refusal and the live yes under `key`."""
        ...

    async def put(self, key: str, which: Literal["yes", "no"], answer: Answer) -> Answer | None:
        """Keep `answer` for `answer.ttl` s; a refusal drops the yes. Returns the yes it
        replaced, if any."""
        ...

    async def drop_yes(self, key: str) -> None: ...

    async def claim(self, key: str, peer: str, seconds: float) -> bool:
        """Whether `peer` now holds (or already held) the claim to ask for `key`."""
        ...

    async def release(self, key: str, peer: str) -> None:
        """Give the claim back, if `peer` holds it."""
        ...


class MemoryBook:
    """Answers and claims in this process, each with its expiry on `clock`."""

    poll = 1.0  # only claims lapse by themselves; answers published here wake waiters at once

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 capacity: int = MEMORY_MAX) -> None:
        self.clock = clock
        self.capacity = capacity
        self._items: dict[tuple[str, str], tuple[float, Any]] = {}

    def _get(self, key: str, part: str) -> tuple[float, Any] | None:
        item = self._items.get((key, part))
        if item is None:
            return None
        if item[0] <= self.clock():
            del self._items[(key, part)]
            return None
        return item

    def _set(self, key: str, part: str, seconds: float, value: Any) -> None:
        if len(self._items) >= self.capacity:
            now = self.clock()
            self._items = {k: v for k, v in self._items.items() if v[0] > now}
            while len(self._items) >= self.capacity:  # all live: the oldest goes
                del self._items[next(iter(self._items))]
        self._items.pop((key, part), None)
        self._items[(key, part)] = (self.clock() + seconds, value)

    def _answer(self, key: str, part: str) -> Answer | None:
        item = self._get(key, part)
        if item is None:
            return None
        status, length = item[1]
        return Answer(status, length, item[0] - self.clock())

    async def read(self, key: str) -> tuple[Answer | None, Answer | None]:
        return self._answer(key, "no"), self._answer(key, "yes")

    async def put(self, key: str, which: Literal["yes", "no"], answer: Answer) -> Answer | None:
        old = self._answer(key, "yes")
        if which == "no":
            self._items.pop((key, "yes"), None)
        self._set(key, which, answer.ttl, (answer.status, answer.length))
        return old

    async def drop_yes(self, key: str) -> None:
        self._items.pop((key, "yes"), None)

    async def claim(self, key: str, peer: str, seconds: float) -> bool:
        held = self._get(key, "claim")
        if held is not None:
            return bool(held[1] == peer)
        self._set(key, "claim", seconds, peer)
        return True

    async def release(self, key: str, peer: str) -> None:
        held = self._get(key, "claim")
        if held is not None and held[1] == peer:
            del self._items[(key, "claim")]


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class RedisBook:
    """Answers and claims as Redis keys with their TTL (`SET ... PX`), named
    `naiad:access:{<key>}:yes|no|claim`: the hash tag puts one key's three in one slot, so
    every call here is a single-slot call on Redis Cluster too, and Redis's own clock expires
    them (no replica's clock is trusted for it)."""

    poll = REDIS_POLL

    def __init__(self, redis: Any, prefix: str = "naiad:access:") -> None:
        self.redis = redis  # redis.asyncio.Redis or RedisCluster
        self.prefix = prefix

    def _k(self, key: str, part: str) -> str:
        return f"{self.prefix}{{{key}}}:{part}"

    async def read(self, key: str) -> tuple[Answer | None, Answer | None]:
        pipe = self.redis.pipeline(transaction=False)
        for part in ("no", "yes"):
            pipe.get(self._k(key, part))
            pipe.pttl(self._k(key, part))
        no, no_ttl, yes, yes_ttl = await pipe.execute()
        return _parse(no, no_ttl), _parse(yes, yes_ttl)

    async def put(self, key: str, which: Literal["yes", "no"], answer: Answer) -> Answer | None:
        value = f"{answer.status} {'' if answer.length is None else answer.length}"
        ms = max(1, int(answer.ttl * 1000))
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self._k(key, "yes"))
        pipe.pttl(self._k(key, "yes"))
        if which == "no":
            pipe.delete(self._k(key, "yes"))
        pipe.set(self._k(key, which), value, px=ms)
        got = await pipe.execute()
        return _parse(got[0], got[1])

    async def drop_yes(self, key: str) -> None:
        await self.redis.delete(self._k(key, "yes"))

    async def claim(self, key: str, peer: str, seconds: float) -> bool:
        name = self._k(key, "claim")
        if await self.redis.set(name, peer, px=int(seconds * 1000), nx=True):
            return True
        return _text(await self.redis.get(name)) == peer

    async def release(self, key: str, peer: str) -> None:
        # Not atomic: a claim that lapsed and was taken by another between the two calls is
        # given back early, which costs at most one extra registry HEAD.
        name = self._k(key, "claim")
        if _text(await self.redis.get(name)) == peer:
            await self.redis.delete(name)


def _parse(value: Any, ttl_ms: Any) -> Answer | None:
    text = _text(value)
    if text is None or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        return None
    status, _, length = text.partition(" ")
    return Answer(int(status), int(length) if length else None, ttl_ms / 1000)


class _Wakeups:
    """Lookups parked on a key until an answer for it is published on this replica."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, int]] = {}

    async def wait(self, key: str, seconds: float) -> None:
        event, n = self._events.get(key, (asyncio.Event(), 0))
        self._events[key] = (event, n + 1)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), seconds)
        finally:
            event_now, n = self._events.get(key, (None, 0))
            if event_now is event:  # not yet notified: one waiter fewer
                if n <= 1:
                    del self._events[key]
                else:
                    self._events[key] = (event, n - 1)

    def notify(self, key: str) -> None:
        event, _ = self._events.pop(key, (None, 0))
        if event is not None:
            event.set()


class AccessService:
    """The lookup (with its long poll and the claim) and the publish, over an `AccessBook`."""

    def __init__(self, book: AccessBook, claim_seconds: float = CLAIM_SECONDS) -> None:
        self.book = book
        self.claim_seconds = claim_seconds
        self._wakeups = _Wakeups()
        # What the scheduler did, for tests and /metrics: answers given, claims, timeouts.
        self.counts = {"shared": 0, "claimed": 0, "unanswered": 0, "published": 0}

    async def lookup(self, q: AccessQuery) -> AccessReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + q.wait_ms / 1000
        while True:
            answer = shared(*await self.book.read(q.key))
            if answer is not None:
                self.counts["shared"] += 1
                return AccessReply(status=answer.status, length=answer.length,
                                   ttl_ms=int(answer.ttl * 1000))
            if await self.book.claim(q.key, q.peer_id, self.claim_seconds):
                self.counts["claimed"] += 1
                return AccessReply(claimed=True)
            left = deadline - loop.time()
            if left <= 0:
                self.counts["unanswered"] += 1
                return AccessReply()
            await self._wakeups.wait(q.key, min(left, self.book.poll))

    async def publish(self, a: AccessAnswer) -> None:
        which = kind(a.status, a.length)
        ttl = capped(a.ttl_ms)
        if which is not None and ttl > 0:
            self.counts["published"] += 1
            old = await self.book.put(a.key, which, Answer(a.status, a.length, ttl))
            if which == "yes" and old is not None and old.length != a.length:
                await self.book.drop_yes(a.key)  # two registries, or a liar: nobody shares
        await self.book.release(a.key, a.peer_id)
        self._wakeups.notify(a.key)


def book_for(store: object) -> AccessBook:
    """The book beside a scheduler's state store: in Redis when the store is (every replica
    then shares the answers), else in this process."""
    redis = getattr(store, "redis", None)
    return RedisBook(redis) if redis is not None else MemoryBook()
