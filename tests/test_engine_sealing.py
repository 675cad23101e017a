"""The whole-blob sha256 beside a stream (peer/engine/sealing.py `Sha256`): in order, the same
digest as hashlib's, the stream held back only when it is too far ahead, and its thread gone
after a digest or a cancel."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

from common import ids
from peer.engine import sealing
from peer.engine.sealing import Sha256


def _hashers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "naiad-sha256"]


async def _until_no_hasher() -> None:
    for _ in range(500):
        if not _hashers():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the hashing thread did not end")


async def test_digest_is_hashlibs_of_the_pieces_in_order() -> None:
    pieces = [os.urandom(n) for n in (1, 1 << 20, 3, 700_001, 1 << 16)]
    hasher = Sha256()
    for p in pieces:
        await hasher.update(bytearray(p))
    await hasher.update(b"")
    assert await hasher.digest() == ids.SHA256_PREFIX + hashlib.sha256(b"".join(pieces)).hexdigest()
    await _until_no_hasher()


async def test_an_empty_stream_has_the_empty_digest_and_no_thread() -> None:
    assert await Sha256().digest() == ids.SHA256_PREFIX + hashlib.sha256().hexdigest()
    assert not _hashers()


async def test_the_stream_waits_only_when_too_far_ahead(monkeypatch) -> None:
    gate = threading.Event()
    real = sealing.hashlib.sha256

    class Held:  # a sha256 whose updates wait for the gate, as a busy core would
        def __init__(self) -> None:
            self.h = real()

        def update(self, data: bytes) -> None:
            gate.wait(5)
            self.h.update(data)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(sealing.hashlib, "sha256", Held)
    hasher = Sha256(behind=3)
    await asyncio.wait_for(hasher.update(b"ab"), 1)  # within the bound: no wait
    await asyncio.wait_for(hasher.update(b"c"), 1)
    blocked = asyncio.create_task(hasher.update(b"d"))  # 4 bytes ahead of it: waits
    await asyncio.sleep(0.05)
    assert not blocked.done()
    gate.set()
    await asyncio.wait_for(blocked, 5)
    assert await hasher.digest() == ids.SHA256_PREFIX + real(b"abcd").hexdigest()
    await _until_no_hasher()


async def test_cancel_drops_what_is_queued_and_ends_the_thread() -> None:
    hasher = Sha256(behind=64 << 20)
    for _ in range(8):
        await hasher.update(os.urandom(1 << 20))
    hasher.cancel()
    await _until_no_hasher()


async def test_the_thread_ends_when_idle_and_starts_again(monkeypatch) -> None:
    monkeypatch.setattr(sealing, "HASH_IDLE", 0.01)
    hasher = Sha256()
    await hasher.update(b"x")
    await _until_no_hasher()
    await hasher.update(b"y")
    assert await hasher.digest() == ids.SHA256_PREFIX + hashlib.sha256(b"xy").hexdigest()
    await _until_no_hasher()
