"""Storage that never takes the peer down: full disks (a small tmpfs), read-only disks (bind
mounts remounted read-only), a full index, damaged stores at start-up, chunk files changed
under --no-verify-on-serve, eviction racing the scrubber, SIGTERM during pulls.

The store's own rules are tested on it directly; what a client sees, with real peers. The mounts
need root: if one fails, the test fails (nothing here is skipped)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from common import ids
from common.models import TaskMeta
from common.tasks import Activity
from peer import scrub
from peer.scrub import Scrubber
from peer.store import CannotStore, ChunkCorrupt, ChunkStore
from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    metric,
    push_blob,
    until,
    wait_registered_peer,
)

MiB = 1 << 20


# -- mounts ------------------------------------------------------------------------------------

def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"mount {' '.join(args)}: {done.stderr.strip()}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A filesystem of `size` at `path` (created), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` read-only while in the block: a read-only bind mount of it over itself. Files
    open already (the index) keep writing through the mount below; whatever is opened or
    created meanwhile (a chunk's temporary file) fails with EROFS, as on a disk remounted
    read-only. The bind mount is made read-only at a staging directory nobody writes through
    and then moved over `path` in one step: bound over `path` first and remounted there, a
    file the peer created through it between the two calls made the remount fail ("mount
    point is busy")."""
    staging = path.with_name(f".{path.name}-read-only")
    staging.mkdir()
    try:
        _mount("--bind", str(path), str(staging))
        try:
            _mount("-o", "remount,ro,bind", str(staging))
            _mount("--move", str(staging), str(path))
        except BaseException:
            _umount(staging)
            raise
        try:
            yield path
        finally:
            _umount(path)
    finally:
        staging.rmdir()


def fill_up(directory: Path) -> Path:
    """Take every free byte of the filesystem `directory` is on; the filler file."""
    filler = directory / "filler"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):  # ENOSPC
        while f.write(block):
            pass
    return filler


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- the store, directly -----------------------------------------------------------------------

def _task(n: int, pieces: int = 2, size: int = 1 << 16) -> TaskMeta:
    return TaskMeta(task_id=f"sha256:{n:064x}", length=pieces * size, piece_size=size)


def _piece(seed: int, i: int, size: int = 1 << 16) -> bytes:
    return bytes([seed & 255, i & 255, seed >> 8]) * (size // 3) + b"x" * (size % 3)


async def _fill(store: ChunkStore, meta: TaskMeta, seed: int) -> list[str]:
    store.put_task(meta)
    chunks = []
    for i in range(meta.length // meta.piece_size):
        data = _piece(seed, i, meta.piece_size)
        chunk = ids.chunk_id(data)
        await store.put_piece(meta.task_id, i, chunk, data)
        chunks.append(chunk)
    return chunks


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def _lost_and_found(root: Path) -> Path:
    (aside,) = (root / "lost+found").iterdir()
    return aside


async def test_unexpected_entries_are_set_aside_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    store = ChunkStore(root)
    store.open()
    meta = _task(1, pieces=3)
    chunks = await _fill(store, meta, seed=1)
    store.close()
    # A directory where a chunk file should be, stray files in chunks/ and in a chunk
    # directory, a directory in tmp/, a symbolic link named like a chunk.
    victim = store.chunk_path(chunks[0])
    victim.unlink()
    victim.mkdir()
    (victim / "inside").write_bytes(b"junk")
    (store.chunks_dir / "stray").write_bytes(b"stray")
    (store.chunks_dir / "ab" / "not-a-chunk").write_bytes(b"?")
    (store.tmp_dir / "a-directory").mkdir()
    link = store.chunk_path(ids.chunk_id(b"link"))
    os.symlink("/etc/hostname", link)

    caplog.set_level(logging.INFO, "naiad.store")
    store.open()
    aside = _lost_and_found(root)
    rel = victim.relative_to(root)
    assert (aside / rel / "inside").read_bytes() == b"junk"
    assert (aside / "chunks" / "stray").read_bytes() == b"stray"
    assert (aside / "chunks" / "ab" / "not-a-chunk").exists()
    assert (aside / "tmp" / "a-directory").is_dir()
    assert os.path.islink(aside / link.relative_to(root))
    for gone in (victim, store.chunks_dir / "stray", store.tmp_dir / "a-directory", link):
        assert not os.path.lexists(gone)
    (warning,) = _warnings(caplog, "set aside")
    assert "5 unexpected entries" in warning and str(rel) in warning
    # The piece whose file was a directory is dropped; the rest is kept and can be stored anew.
    assert store.pieces(meta.task_id) == {1: chunks[1], 2: chunks[2]}
    data = _piece(1, 0)
    await store.put_piece(meta.task_id, 0, chunks[0], data)
    assert await store.read_chunk(chunks[0], verify=True) == data
    store.close()


async def test_garbage_index_is_set_aside_and_what_it_held_removed_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    store = ChunkStore(root)
    store.open()
    chunks = await _fill(store, _task(1), seed=2)
    store.close()
    garbage = os.urandom(8192)
    (root / "index.db").write_bytes(garbage)

    caplog.set_level(logging.INFO, "naiad.store")
    store.open()
    assert (_lost_and_found(root) / "index.db").read_bytes() == garbage
    (warning,) = _warnings(caplog, "was damaged")
    assert "file is not a database" in warning and "0 tasks" in warning
    assert store.tasks() == [] and store.bytes == 0
    assert not any(store.chunk_path(c).exists() for c in chunks)
    assert _warnings(caplog, "2 chunk files were there")  # a warning, not an info line
    await _fill(store, _task(3), seed=3)  # a working store again
    assert len(store.tasks()) == 1
    store.close()


async def test_half_truncated_index_is_rebuilt_from_what_it_can_vouch_for(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    store = ChunkStore(root)
    store.open()
    held: dict[str, dict[int, str]] = {}
    for n in range(150):
        meta = _task(n, size=1 << 16)
        chunks = await _fill(store, meta, seed=n)
        store.mark_sealed(meta.task_id)
        held[meta.task_id] = dict(enumerate(chunks))
    store.close()
    index = root / "index.db"
    with open(index, "r+b") as f:
        f.truncate(index.stat().st_size // 2)

    caplog.set_level(logging.INFO, "naiad.store")
    store.open()
    assert _warnings(caplog, "was damaged")
    assert (_lost_and_found(root) / "index.db").exists()
    kept = store.tasks()
    assert 0 < len(kept) < 150 and any(t.pieces for t in kept), "some rows are still readable"
    for t in kept:  # what is kept is what was held, its files whole, its seal to be proven
        assert not t.meta.sealed
        assert t.pieces.items() <= held[t.meta.task_id].items()
        for chunk in t.pieces.values():
            await store.read_chunk(chunk, verify=True)
    assert store.check(full=True) == 0
    assert store.bytes == sum(len(t.pieces) for t in kept) * (1 << 16)
    store.close()


async def test_a_lost_index_is_a_warning(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    store = ChunkStore(root)
    store.open()
    await _fill(store, _task(1, pieces=3), seed=4)
    store.close()
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        (root / name).unlink(missing_ok=True)
    caplog.set_level(logging.INFO, "naiad.store")
    store.open()
    assert _warnings(caplog, "the index lists nothing, yet 3 chunk files were there")
    assert not [r for r in caplog.records if r.levelno == logging.INFO]
    store.close()


async def test_a_full_index_is_cannot_store_and_nothing_is_half_kept(tmp_path: Path) -> None:
    """Space for the chunk but not for its index row (sqlite's max_page_count stands in for a
    disk that fills up between the two writes)."""
    store = ChunkStore(tmp_path / "store")
    store.open()
    meta = _task(1, pieces=400, size=1 << 16)
    store.put_task(meta)
    (pages,) = store.db.execute("PRAGMA page_count").fetchone()
    store.db.execute(f"PRAGMA max_page_count = {pages + 1}")
    stored = 0
    with pytest.raises(CannotStore) as failed:
        for i in range(400):
            data = _piece(9, i)
            await store.put_piece(meta.task_id, i, ids.chunk_id(data), data)
            stored += 1
    assert failed.value.full, "sqlite's 'database or disk is full' is for want of space"
    lost = _piece(9, stored)
    assert not store.chunk_path(ids.chunk_id(lost)).exists(), "no file without its index row"
    assert store.bytes == stored * (1 << 16) == store.cache_bytes()
    assert len(store.pieces(meta.task_id)) == stored
    store.db.execute("PRAGMA max_page_count = 1073741823")  # room again: caching works
    await store.put_piece(meta.task_id, stored, ids.chunk_id(lost), lost)
    assert len(store.pieces(meta.task_id)) == stored + 1
    store.close()


async def test_a_read_only_disk_is_cannot_store_and_loses_nothing(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    store = ChunkStore(root)
    store.open()
    meta = _task(1)
    chunks = await _fill(store, meta, seed=5)
    data = _piece(6, 0)
    with read_only(root):
        with pytest.raises(CannotStore) as failed:
            await store.put_piece(meta.task_id, 0, ids.chunk_id(data), data)
        assert not failed.value.full, "read-only is not for want of space: evicting won't help"
        assert not store.chunk_path(ids.chunk_id(data)).exists()
        assert store.pieces(meta.task_id) == dict(enumerate(chunks))  # nothing lost
        assert await store.read_chunk(chunks[1], verify=True) == _piece(5, 1)
    await store.put_piece(meta.task_id, 0, ids.chunk_id(data), data)  # the disk is back
    assert store.pieces(meta.task_id)[0] == ids.chunk_id(data)
    store.close()

    other = _task(2)
    with read_only(root):  # a start on the read-only disk: the cache served, nothing written
        again = ChunkStore(root)
        again.open()
        assert again.read_only is not None
        assert again.pieces(meta.task_id) == {0: ids.chunk_id(data), 1: chunks[1]}
        assert await again.read_chunk(chunks[1], verify=True) == _piece(5, 1)
        for write in (lambda: again.put_task(other), lambda: again.drop_task(meta.task_id),
                      lambda: again.touch(meta.task_id, 5.0)):
            with pytest.raises(CannotStore):
                write()
        assert not again.reopen()
    assert again.reopen() and again.read_only is None
    assert again.put_task(other)
    await again.put_piece(other.task_id, 0, chunks[1], _piece(5, 1))
    assert again.pieces(other.task_id) == {0: chunks[1]}
    again.close()


async def test_a_read_only_index_is_cannot_store(tmp_path: Path) -> None:
    """sqlite refusing writes ("attempt to write a readonly database") at any call."""
    store = ChunkStore(tmp_path / "store")
    store.open()
    meta = _task(1)
    chunks = await _fill(store, meta, seed=6)
    store.db.execute("PRAGMA query_only = 1")
    data = _piece(7, 0)
    for write in (lambda: store.put_task(_task(2)), lambda: store.touch(meta.task_id, 1.0),
                  lambda: store.mark_sealed(meta.task_id)):
        with pytest.raises(CannotStore) as failed:
            write()
        assert not failed.value.full
    with pytest.raises(CannotStore):
        await store.put_piece(meta.task_id, 0, ids.chunk_id(data), data)
    assert not store.chunk_path(ids.chunk_id(data)).exists(), "no file without its index row"
    assert store.pieces(meta.task_id) == dict(enumerate(chunks))
    assert store.bytes == 2 * (1 << 16)
    store.close()


async def test_check_store_on_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """`naiad check-store` finding a rotten chunk on a disk too full to record the drop."""
    with tmpfs(tmp_path / "full", "2m") as root:
        store = ChunkStore(root)
        store.open()
        chunks = await _fill(store, _task(1), seed=11)
        store.close()
        path = store.chunk_path(chunks[1])
        raw = bytearray(path.read_bytes())
        raw[7] ^= 1
        path.write_bytes(bytes(raw))
        fill_up(root)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "naiad", "check-store", "--data-dir", str(root),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and out == b"", err.decode()
    assert "Traceback" not in err.decode()
    assert lines[-1].startswith(f"naiad check-store: --data-dir {root}: dropping chunk "
                                f"{chunks[1]}"), err.decode()


async def test_the_scrubber_skips_chunks_eviction_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scrub, "QUIET_SECONDS", 0.0)
    store = ChunkStore(tmp_path / "store")
    store.open()
    for n in range(4):
        await _fill(store, _task(n), seed=n)
    missing = store.pieces(_task(3).task_id)[0]  # really missing: indexed, file gone
    listed = store.chunks_after
    calls: list[str] = []

    def then_evict(chunk: str, limit: int) -> list[tuple[str, int]]:
        calls.append(chunk)
        if len(calls) > 1:  # one pass only: then the scrubber idles
            return listed(chunk, limit) if chunk else []
        batch = listed(chunk, limit)
        # Eviction runs between the listing and the reads.
        store.drop_task(_task(0).task_id)
        store.drop_task(_task(1).task_id)
        store.chunk_path(missing).unlink()
        return batch

    monkeypatch.setattr(store, "chunks_after", then_evict)

    class Engine:
        dropped: list[str] = []

        def drop_chunk(self, chunk: str) -> None:
            self.dropped.append(chunk)
            store.drop_chunk(chunk)

    engine = Engine()
    scrubber = Scrubber(store, engine, rate=1 << 30, parts=[Activity()])  # type: ignore[arg-type]
    task = asyncio.create_task(scrubber.run())
    try:
        async def one_pass() -> bool:
            return scrubber.passes >= 1
        await until(one_pass, 10, "a scrub pass")
    finally:
        task.cancel()
    assert engine.dropped == [missing], "only the chunk really missing counts as a failure"
    assert scrubber.checked == 4  # tasks 2 and 3, two chunks each
    assert scrubber.passes == 1
    store.close()


async def test_unverified_reads_rehash_a_chunk_file_changed_since_written(
        tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    store.stamping = True
    store.open()
    chunks = await _fill(store, _task(1, pieces=3), seed=7)
    assert all(store.unchanged(c) for c in chunks)
    # Flipped in place, and two same-size files swapped by rename.
    path = store.chunk_path(chunks[0])
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1
    path.write_bytes(bytes(raw))
    a, b = store.chunk_path(chunks[1]), store.chunk_path(chunks[2])
    os.rename(a, a.with_suffix(".swap"))
    os.rename(b, a)
    os.rename(a.with_suffix(".swap"), b)
    for chunk in chunks:
        assert not store.unchanged(chunk)
        with pytest.raises(ChunkCorrupt):
            await store.read_chunk(chunk, verify=False)
    store.close()
    # A restarted peer vouches for no file until it has hashed it once.
    fresh = ChunkStore(tmp_path / "other")
    fresh.stamping = True
    fresh.open()
    (chunk,) = await _fill(fresh, _task(2, pieces=1), seed=8)
    fresh.close()
    again = ChunkStore(tmp_path / "other")
    again.stamping = True
    again.open()
    assert not again.unchanged(chunk)
    assert await again.read_chunk(chunk, verify=False) == _piece(8, 0)
    assert again.unchanged(chunk)
    again.close()


# -- real peers --------------------------------------------------------------------------------

async def _get(url: str, headers: dict[str, str] | None = None,
               seconds: float = 60.0) -> tuple[bytes, dict]:
    """A whole response, exact or failing; bounded, so a wedged pull fails the test."""
    async with aiohttp.ClientSession() as s, \
            s.get(url, headers=headers or {}, timeout=aiohttp.ClientTimeout(total=seconds)) as r:
        assert r.status in (200, 206), await r.text()
        return await r.read(), dict(r.headers)


def _chunk_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "chunks").glob("*/*")
                  if p.is_file() and "." not in p.name)


async def _held(scheduler: str, task_id: str, peer_id: str) -> int:
    """How many pieces of the task the scheduler lists `peer_id` as holding."""
    async with member_session() as s, s.get(f"{scheduler}/api/v1/tasks/{task_id}") as r:
        task = await r.json()
    return sum(peer_id in p["holders"] for p in task["piece_map"])


def _no_traceback(logs: str) -> None:
    """No traceback through the store, the engine or the mirror (the parts under test)."""
    for block in logs.split("Traceback (most recent call last):")[1:]:
        frames = block.split("\n2")[0]  # up to the next log line
        assert not any(f"peer/{m}" in frames for m in ("store.py", "engine/", "mirror.py")) \
            and "sqlite3" not in frames, logs


async def _cached(url: str) -> bool:
    """Whether a pull of `url` is served from the peer's store."""
    _, headers = await _get(url)
    return headers["X-Naiad-Source"] == "local"


async def test_a_full_disk_without_a_quota_keeps_room_and_serves_also_after_a_restart(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    blobs = [os.urandom(3 * MiB // 2 + n) for n in range(5)]
    digests = [await push_blob(registry.url, repo, b) for b in blobs]
    urls = [f"{{}}/v2/{repo}/blobs/{d}" for d in digests]
    with tmpfs(tmp_path / "small-disk", "4m") as data:
        try:
            floor = int(0.05 * os.statvfs(data).f_blocks * os.statvfs(data).f_frsize)
            sched = await cluster.scheduler()
            peer = await cluster.peer("p", sched.url, origin.url, "--data-dir", str(data),
                                      "--no-prefetch")
            # Four blobs of 1.5 MiB on a 4 MiB disk: the least recently used make room, and
            # some space is always left (the index must be writable to record evictions).
            for url, blob in zip(urls[:4], blobs, strict=False):
                body, _ = await _get(url.format(peer.url))
                assert body == blob
                assert free_bytes(data) >= floor // 2
            assert await _cached(urls[3].format(peer.url))
            body, headers = await _get(urls[0].format(peer.url))
            assert body == blobs[0] and headers["X-Naiad-Source"] != "local"

            # Something else takes every free byte; the peer restarts on the full disk.
            peer.proc.stop()
            filler = fill_up(data)
            assert free_bytes(data) < 4096
            await cluster.restart(peer)
            for url, blob in zip(urls, blobs, strict=True):  # cached or not: every byte exact
                body, _ = await _get(url.format(peer.url))
                assert body == blob
            logs = peer.proc.logs()
            assert "disk full" in logs or "cannot write the store" in logs or \
                "cannot be opened for writing" in logs, logs
            _no_traceback(logs)
            # The space comes back: caching is tried again after the backoff.
            filler.unlink()
            new = os.urandom(MiB // 2)
            url = f"{peer.url}/v2/{repo}/blobs/{await push_blob(registry.url, repo, new)}"
            await until(lambda: _cached(url), 30, "the new blob cached once there is room")
            assert (await _get(url))[0] == new
        finally:
            cluster.stop()


async def test_a_read_only_blip_mid_run_does_not_wedge_the_blob(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """The data directory read-only for 1 s while the origin run stores its pieces: the pull
    completes, exact; so does the next; caching resumes after the backoff."""
    blob = os.urandom(16 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url, "--origin-rate", "4MiB",
                              "--no-prefetch")
    data = cluster.workdir / "p"
    url = f"{peer.url}/v2/{repo}/blobs/{digest}"
    puller = asyncio.create_task(_get(url))

    async def some_stored() -> bool:
        return len(_chunk_files(data)) >= 2
    await until(some_stored, 30, "the first pieces stored")
    with read_only(data):
        await asyncio.sleep(1.0)  # the blip itself: the fault lasts a second
    body, _ = await puller
    assert body == blob
    logs = peer.proc.logs()
    assert "cannot write the store" in logs, logs
    assert len(_chunk_files(data)) < 16, "some pieces passed through uncached"
    body, _ = await _get(url)
    assert body == blob
    await until(lambda: _cached(url), 60, "every piece cached again after the backoff")
    _no_traceback(peer.proc.logs())


async def test_a_restarted_peer_withdraws_what_it_dropped_at_start_up(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    """Damage at rest set aside, never a crash; the scheduler's list of what the peer holds
    replaced by what its restarted process re-announces, not merged with the old one."""
    blob = os.urandom(4 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    url = "{}/v2/" + repo + "/blobs/" + digest
    # A long heartbeat interval: the killed process's record outlives its restart.
    sched = await cluster.scheduler("--heartbeat-interval", "5")
    peer = await cluster.peer("p", sched.url, origin.url, "--no-prefetch", "--scrub-rate", "0")
    data = cluster.workdir / "p"
    assert (await _get(url.format(peer.url)))[0] == blob

    async def held(n: int) -> bool:
        return await _held(sched.url, digest, "p") == n
    await until(lambda: held(4), what="all four pieces announced")

    peer.proc.kill()
    victim = _chunk_files(data)[0]
    victim.unlink()
    victim.mkdir()  # a directory where a chunk file should be
    (data / "chunks" / "stray").write_bytes(b"stray")
    (data / "tmp" / "a-directory").mkdir()
    await cluster.restart(peer)
    await wait_registered_peer(sched.url, "p")
    await until(lambda: held(3), what="the dropped piece no longer listed as held")
    logs = peer.proc.logs()
    assert "set aside 3 unexpected entries" in logs, logs
    _no_traceback(logs)
    assert (await _get(url.format(peer.url)))[0] == blob
    await until(lambda: held(4), what="the piece fetched again and announced")

    # A garbage index: set aside, rebuilt empty, and everything it held withdrawn by omission.
    peer.proc.kill()
    (data / "index.db").write_bytes(os.urandom(8192))
    for name in ("index.db-wal", "index.db-shm"):  # else its pages come from the WAL
        (data / name).unlink(missing_ok=True)
    await cluster.restart(peer)
    await until(lambda: held(0), what="what the lost index held withdrawn")
    logs = peer.proc.logs()
    assert "index.db was damaged" in logs, logs
    _no_traceback(logs)
    assert (await _get(url.format(peer.url)))[0] == blob

    # check-store of a stopped peer's damaged store: a report, never a traceback.
    peer.proc.stop()
    (data / "tmp" / "another-directory").mkdir()
    (data / "index.db").write_bytes(b"SQLite format 3\0" + os.urandom(4000))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", "check-store", "--data-dir", str(data),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out
    _no_traceback(out)
    assert "0 pieces checked, 0 dropped" in out and "was damaged" in out, out


async def test_no_verify_on_serve_never_sends_a_changed_chunk_file(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    """Served by sendfile without re-hashing, but only chunk files unchanged since this
    process wrote or verified them: flipped or swapped files are re-hashed, dropped and
    fetched again, never sent as a clean 200."""
    blob = os.urandom(6 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url, "--no-verify-on-serve",
                              "--scrub-rate", "0", "--no-prefetch")
    url = f"{peer.url}/v2/{repo}/blobs/{digest}"
    assert (await _get(url))[0] == blob  # hashed whole on the way: sealed
    body, headers = await _get(url)
    assert body == blob and headers["X-Naiad-Source"] == "local"
    files = _chunk_files(cluster.workdir / "p")
    assert len(files) == 6
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    files[0].write_bytes(bytes(raw))  # flipped in place
    swap = files[1].with_name("swap")
    os.rename(files[1], swap)
    os.rename(files[2], files[1])
    os.rename(swap, files[2])  # two same-size chunk files swapped
    body, _ = await _get(url)
    assert body == blob
    assert await metric(peer.url, "naiad_peer_verify_failures_total") >= 3
    # Ranges over them, now fetched again and verified, are exact too.
    body, _ = await _get(url, {"Range": f"bytes={MiB - 10}-{3 * MiB + 10}"})
    assert body == blob[MiB - 10:3 * MiB + 11]


async def test_sigterm_lets_client_pulls_finish_and_refuses_new_ones(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    blob = os.urandom(12 * MiB)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, origin.url, "--origin-rate", "4MiB",
                              "--no-prefetch")
    url = f"{peer.url}/v2/{repo}/blobs/{digest}"
    got = bytearray()
    flowing = asyncio.Event()

    async def pull() -> None:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200
            async for part in r.content.iter_chunked(64 << 10):
                got.extend(part)
                if len(got) >= MiB:
                    flowing.set()

    puller = asyncio.create_task(pull())
    await asyncio.wait_for(flowing.wait(), 30)
    peer.proc.popen.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()

    async def refusing() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{peer.url}/healthy") as r:
            return r.status == 503
    await until(refusing, 5, "new requests refused while draining")
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 503 and "shutting down" in (await r.json())["error"]
    await asyncio.wait_for(puller, 15)
    assert bytes(got) == blob, "the pull under way finished, exact"
    assert len(blob) / (4 * MiB) - 1 > 1.5, "the pull outlasted the old 1 s shutdown"
    code = await asyncio.to_thread(peer.proc.popen.wait, 15)
    assert code == 0
    assert time.monotonic() - stopped_at < 12
    _no_traceback(peer.proc.logs())
