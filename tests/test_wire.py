"""zstd between peers: compressed only when it pays, verified after decompression, bombs and
garbage refused; end to end, compressible chunks cross the wire smaller and arrive exact."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
import zstandard

from common import ids
from common.metrics import PeerMetrics
from common.models import TaskMeta
from peer import upload, wire
from peer.store import ChunkStore
from peer.upload import UploadServer
from tests.cluster import Cluster, CountingProxy, Registry, metric, push_blob

MiB = 1 << 20


@pytest.mark.parametrize(("raw", "packed", "expected"), [
    (1000, 900, True), (1000, 901, False), (1000, 100, True), (1000, 1000, False),
    (1000, 1200, False)])
def test_worth_it_at_ten_percent(raw: int, packed: int, expected: bool) -> None:
    assert wire.worth_it(raw, packed) is expected


def test_pack_round_trip_and_incompressible() -> None:
    text = b"layer text " * 50_000
    packed = wire.pack(text)
    assert packed is not None and len(packed) < len(text) // 10
    assert wire.unpack(packed, len(text)) == text
    assert wire.pack(os.urandom(MiB)) is None


def test_unpack_refuses_bombs_garbage_and_wrong_sizes() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (256 * MiB))
    assert len(bomb) < 64 * 1024
    for data, size in ((bomb, MiB), (b"not zstd", 10),
                       (wire.pack(b"x" * 10_000), 9_999), (wire.pack(b"x" * 10_000), 10_001)):
        with pytest.raises(wire.WireError):
            wire.unpack(data, size)


async def test_compressible_chunks_cross_the_wire_compressed(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    text = (b"naiad " * 200_000)[:6 * MiB]
    noise = os.urandom(3 * MiB)
    digests = [await push_blob(registry.url, repo, b) for b in (text, noise)]
    sched = await cluster.scheduler()
    a = await cluster.peer("a", sched.url, origin.url)
    b = await cluster.peer("b", sched.url, origin.url)
    async with aiohttp.ClientSession() as s:
        for digest, blob in zip(digests, (text, noise), strict=True):
            async with s.get(f"{a.url}/v2/{repo}/blobs/{digest}") as r:
                assert await r.read() == blob
            before = await metric(a.url, "naiad_peer_upload_bytes_total")
            async with s.get(f"{b.url}/v2/{repo}/blobs/{digest}") as r:
                assert await r.read() == blob
            sent = await metric(a.url, "naiad_peer_upload_bytes_total") - before
            got = await metric(b.url, "naiad_peer_download_bytes_total", {"source": "peer"})
            if blob is text:
                assert sent < len(blob) / 20, f"text crossed as {sent} bytes"
                assert got == len(blob)
            else:
                assert sent == len(blob), "random bytes travel as they are"
    chunks = cluster.workdir / "a" / "chunks"
    distinct_text = {text[i:i + MiB] for i in range(0, len(text), MiB)}  # pieces dedupe
    assert len(list(chunks.glob("*/*.zst"))) == len(distinct_text)
    assert not list(chunks.glob("*/*.raw")), "incompressible chunks are remembered, not marked"


def test_pack_file_decides_as_pack_does(tmp_path: Path) -> None:
    cases = {"text": b"layer of text " * 100_000, "random": os.urandom(MiB),
             "random head": os.urandom(wire.SAMPLE) + b"\0" * MiB,  # the sample decides
             "small": b"y" * 1000}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert wire.pack_file(path) == wire.pack(data), name
    assert wire.pack_file(tmp_path / "text") is not None
    assert wire.pack_file(tmp_path / "random head") is None


async def test_upload_decides_once_per_chunk_and_remembers_raw_ones_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender tries each chunk once: a compressible one gets its sidecar, an incompressible
    one is remembered (no marker file), least recently asked forgotten past RAW_REMEMBERED."""
    store = ChunkStore(tmp_path / "store")
    store.open()
    trials: list[str] = []
    real, real_sample = wire.pack_file, wire.sample_says_raw
    monkeypatch.setattr(wire, "pack_file", lambda path: trials.append(path.name) or real(path))
    monkeypatch.setattr(wire, "sample_says_raw",
                        lambda fd, size: trials.append("sample") or real_sample(fd, size))
    monkeypatch.setattr(upload, "RAW_REMEMBERED", 2)
    server = UploadServer(store, PeerMetrics(), slots=4)
    meta = TaskMeta(task_id=f"sha256:{1:064x}", length=4 * MiB, piece_size=MiB)
    store.put_task(meta)
    blobs = [b"text " * (MiB // 5), os.urandom(MiB), os.urandom(MiB), os.urandom(MiB)]
    chunks = [ids.chunk_id(b) for b in blobs]
    for i, (chunk, data) in enumerate(zip(chunks, blobs, strict=True)):
        await store.put_piece(meta.task_id, i, chunk, data)
    text, r1, r2, r3 = chunks
    assert await _packed(server, text) == store.packed_path(text)
    assert await _packed(server, r1) is None and await _packed(server, r2) is None
    assert await _packed(server, text) == store.packed_path(text)
    assert await _packed(server, r1) is None
    # The text's sample shrinks (then pack_file compresses it); the noise is told raw from its
    # sample in the page cache, on the loop.
    assert trials == ["sample", text.removeprefix("blake3:"), "sample", "sample"]
    await _packed(server, r3)  # r2, least recently asked, is forgotten
    assert await _packed(server, r1) is None and len(trials) == 5
    assert await _packed(server, r2) is None and len(trials) == 6
    assert not list(store.chunks_dir.glob("*/*.raw"))
    store.close()


async def _packed(server: UploadServer, chunk: str) -> Path | None:
    with open(server.store.chunk_path(chunk), "rb") as f:
        return await server._packed(chunk, f)


def test_the_sample_in_memory_decides_as_pack_file_does(tmp_path: Path) -> None:
    """Told from the page cache on the loop, the sample's verdict is pack_file's; a chunk too
    small for a sample is left to pack_file."""
    cases = {"text": b"layer of text " * 100_000, "random": os.urandom(MiB),
             "random head": os.urandom(wire.SAMPLE) + b"\0" * MiB, "small": b"y" * 1000}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with open(path, "rb") as f:
            raw = wire.sample_says_raw(f.fileno(), len(data))
        if name == "small":
            assert raw is None
        else:
            assert raw is not None, f"{name}: just written, it is in the page cache"
            assert raw == (wire.pack_file(path) is None), name
