"""Model hubs through naiad (issue 16, part 4): the real `huggingface_hub` client with
HF_ENDPOINT at a peer, against a small local hub and CDN (tests/hub.py), two real peers and a
real scheduler; `naiad get hf://...`; and peer/hub.py's pure helpers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from peer import hub
from peer.mirror import AccessCache
from peer.origin import OriginRequest, Probe
from tests.cluster import Cluster, metric, naiad
from tests.hub import Cdn, Hub, git_blob_id, resolve_url

SHA = "ab" * 32

# --- peer/hub.py, pure -------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "want"), [
    ("/acme/tiny/resolve/main/config.json", hub.HubFile("model", "acme/tiny", "main",
                                                        "config.json")),
    ("/acme/tiny/resolve/refs%2Fpr%2F1/sub/a%20b.bin",
     hub.HubFile("model", "acme/tiny", "refs/pr/1", "sub/a b.bin")),
    ("/gpt2/resolve/" + "c" * 40 + "/model.bin", hub.HubFile("model", "gpt2", "c" * 40,
                                                             "model.bin")),
    ("/datasets/acme/set/resolve/v1/data/train.parquet",
     hub.HubFile("dataset", "acme/set", "v1", "data/train.parquet")),
    ("/spaces/acme/app/resolve/main/app.py", hub.HubFile("space", "acme/app", "main", "app.py")),
    ("/acme/tiny/resolve/main/", None),  # no file
    ("/acme/tiny/resolve/main", None),
    ("/acme/tiny/blob/main/config.json", None),  # the web page, not a download
    ("/api/models/acme/tiny", None),
    ("/v2/acme/blobs/sha256:" + SHA, None),
    ("/../x/resolve/main/f", None),
])
def test_parse_resolve(raw: str, want: hub.HubFile | None) -> None:
    assert hub.parse_resolve(raw) == want


def test_lfs_file_from_the_metadata_answer() -> None:
    lfs = {"X-Linked-Etag": f'"{SHA.upper()}"', "X-Linked-Size": "5242880",
           "X-Repo-Commit": "c" * 40, "ETag": f'"{SHA}"', "Location": "https://cdn/x?sig=1"}
    got = hub.lfs_file(302, CIMultiDict(lfs))
    assert got == hub.LfsFile(SHA, 5 << 20) and got.task_id == f"sha256:{SHA}"
    assert hub.lfs_file(200, CIMultiDict({**lfs, "X-Linked-Etag": f'W/"{SHA}"'})) is not None
    # A small file kept in git, a refusal, a malformed hash or size: not an LFS task.
    assert hub.lfs_file(200, CIMultiDict({"ETag": '"' + "d" * 40 + '"'})) is None
    assert hub.lfs_file(401, CIMultiDict(lfs)) is None
    assert hub.lfs_file(302, CIMultiDict({**lfs, "X-Linked-Etag": '"' + "d" * 40 + '"'})) is None
    assert hub.lfs_file(302, CIMultiDict({**lfs, "X-Linked-Size": "-1"})) is None


def test_client_headers_keep_the_metadata_and_nothing_that_leaves_the_peer() -> None:
    answer = CIMultiDict({"x-linked-etag": f'"{SHA}"', "x-linked-size": "10",
                          "x-repo-commit": "c" * 40, "etag": f'"{SHA}"',
                          "location": "https://cdn/x?sig=1", "x-xet-hash": "e" * 64,
                          "link": '<https://hub/api/xet-read-token>; rel="xet-auth"',
                          "set-cookie": "a=b"})
    assert hub.client_headers(answer) == {
        "X-Repo-Commit": "c" * 40, "X-Linked-Etag": f'"{SHA}"', "X-Linked-Size": "10",
        "ETag": f'"{SHA}"'}


@pytest.mark.parametrize(("url", "want"), [
    ("hf://acme/tiny", hub.HubRef("model", "acme/tiny", None)),
    ("hf://acme/tiny/", hub.HubRef("model", "acme/tiny", None)),
    ("hf://models/acme/tiny/sub/w.bin", hub.HubRef("model", "acme/tiny", "sub/w.bin")),
    ("hf://datasets/acme/set/data/train.parquet",
     hub.HubRef("dataset", "acme/set", "data/train.parquet")),
    ("hf://spaces/acme/app", hub.HubRef("space", "acme/app", None)),
])
def test_parse_hf_url(url: str, want: hub.HubRef) -> None:
    assert hub.parse_hf_url(url) == want


@pytest.mark.parametrize("url", ["https://acme/tiny", "hf://acme", "hf://acme/../x",
                                 "hf://acme/tiny/../../etc/passwd", "hf://acme/tiny//x",
                                 "hf://datasets/acme"])
def test_parse_hf_url_refuses(url: str) -> None:
    with pytest.raises(hub.BadHubUrl):
        hub.parse_hf_url(url)


def test_paths_encode_like_huggingface_hub() -> None:
    from huggingface_hub import hf_hub_url

    for kind, repo_type in (("model", None), ("dataset", "dataset"), ("space", "space")):
        want = hf_hub_url("acme/tiny", "sub/a b.bin", repo_type=repo_type, revision="refs/pr/1",
                          endpoint="http://peer")
        assert "http://peer" + hub.resolve_path(kind, "acme/tiny", "refs/pr/1",
                                                "sub/a b.bin") == want
        assert hub.parse_resolve(want.removeprefix("http://peer")) == hub.HubFile(
            kind, "acme/tiny", "refs/pr/1", "sub/a b.bin")
    assert hub.revision_api_path("model", "acme/tiny", "main") == \
        "/api/models/acme/tiny/revision/main"


def test_expected_digest_and_git_blob_id() -> None:
    assert hub.expected_digest({"X-Linked-Etag": f'"{SHA}"', "ETag": '"x"'}) == \
        hub.Expected("sha256", SHA)
    assert hub.expected_digest({"ETag": '"' + "d" * 40 + '"'}) == \
        hub.Expected("git-sha1", "d" * 40)
    assert hub.expected_digest({"ETag": '"not-a-hash"'}) is None
    # `git hash-object` of "hello\n".
    h = hub.git_blob_hasher(6)
    h.update(b"hello\n")
    assert h.hexdigest() == "ce013625030ba8dba906f756967f9e9ca394464a" == git_blob_id(b"hello\n")


async def test_access_cache_shares_one_question_and_keeps_only_answers_below_500() -> None:
    asked: list[str] = []
    release = asyncio.Event()
    status = 302

    async def ask(req: OriginRequest) -> Probe:
        asked.append(req.url)
        await release.wait()
        return Probe(status, 10, CIMultiDict())

    cache = AccessCache(origin=None)  # type: ignore[arg-type] - only `ask` is used
    req = OriginRequest("http://hub/a/b/resolve/main/w", "http://hub", "Bearer t")
    waiting = [asyncio.ensure_future(cache.probe(req, "hub x", ask)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert [p.status for p in await asyncio.gather(*waiting)] == [302] * 3
    assert len(asked) == 1
    assert (await cache.probe(req, "hub x", ask)).status == 302 and len(asked) == 1
    status = 503
    other = OriginRequest(req.url, req.registry, "Bearer other")  # another credential: asked
    assert (await cache.probe(other, "hub x", ask)).status == 503
    assert (await cache.probe(other, "hub x", ask)).status == 503 and len(asked) == 3


# --- the real client through two peers --------------------------------------------------------

CLIENT = """
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download
a = json.loads(sys.argv[1])
try:
    if a["file"]:
        out = {"files": {a["file"]: hf_hub_download(a["repo"], a["file"], token=a["token"])}}
    else:
        out = {"root": snapshot_download(a["repo"], token=a["token"])}
except Exception as e:
    out = {"error": type(e).__name__, "message": str(e)[:800]}
print(json.dumps(out))
"""


async def hf_client(endpoint: str, home: Path, repo: str, file: str | None = None,
                    token: str | bool = False, xet: bool = True) -> dict:
    """huggingface_hub in a process of its own (it reads HF_ENDPOINT when imported), with a
    fresh HF_HOME; its JSON answer: the downloaded files, or the error it raised. `xet=False`
    is HF_HUB_DISABLE_XET=1, which snapshot_download needs to stay on the peer: it takes Xet
    hashes from the hub's tree listing, which the peer passes through unchanged."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, json.dumps({"repo": repo, "file": file, "token": token}),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def naiad_get(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        *naiad("get", *args), env=base | (env or {}), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode()


@pytest.fixture
async def hub_servers() -> AsyncIterator[Hub]:
    cdn = Cdn()
    await cdn.start()
    h = Hub(cdn)
    await h.start()
    yield h
    await h.stop()
    await cdn.stop()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".cache" not in p.parts}


async def test_huggingface_hub_downloads_through_two_peers(
        cluster: Cluster, hub_servers: Hub, tmp_path: Path) -> None:
    h, cdn = hub_servers, hub_servers.cdn
    rnd = random.Random(16)
    weights = rnd.randbytes(5 << 20)
    secret_weights = rnd.randbytes(1 << 20)
    public = {"config.json": b'{"model_type": "tiny"}\n', "model.safetensors": weights,
              "sub/tokenizer.json": b'{"vocab": {}}\n'}
    h.add("acme/tiny", public)
    h.add("acme/tiny-copy", {"weights/model.safetensors": weights, "README.md": b"# copy\n"})
    private = h.add("acme/secret", {"config.json": b"{}\n", "weights.bin": secret_weights},
                    token="hf_right")
    sched = await cluster.scheduler()
    args = ("--hub", h.url, "--allow-registry", cdn.url)  # the CDN is on loopback: named
    p1 = await cluster.peer("p1", sched.url, "http://127.0.0.1:9", *args)
    p2 = await cluster.peer("p2", sched.url, "http://127.0.0.1:9", *args)

    # Peer 1: the whole repository, as snapshot_download lays it out.
    got = await hf_client(p1.url, tmp_path / "home1", "acme/tiny", xet=False)
    assert "root" in got, got
    assert tree(Path(got["root"])) == public
    assert len(weights) <= cdn.bytes_served <= len(weights) * 1.1
    lfs_gets = [r for r in h.resolves("model.safetensors") if r[0] == "GET"]
    assert lfs_gets, "the peer fetched the LFS file through the hub's redirect"

    # Peer 2, a fresh cache: the LFS file comes from peer 1, not from the CDN again. (With
    # hf_xet installed and Xet on: the peer's HEAD answer offers no Xet, so it stays here.)
    before = cdn.bytes_served
    got = await hf_client(p2.url, tmp_path / "home2", "acme/tiny", "model.safetensors")
    assert Path(got["files"]["model.safetensors"]).read_bytes() == weights, got
    assert cdn.bytes_served == before
    assert await metric(p2.url, "naiad_peer_download_bytes_total",
                        {"source": "peer"}) >= len(weights)

    # What the client reads from a HEAD, with no redirect off the peer; ranges as for blobs.
    sha = hashlib.sha256(weights).hexdigest()
    url = resolve_url(p2.url, "acme/tiny", "model.safetensors")
    async with aiohttp.ClientSession() as s:
        async with s.head(url, allow_redirects=False) as r:
            assert r.status == 200 and "Location" not in r.headers
            assert r.headers["X-Linked-Etag"] == f'"{sha}"' == r.headers["ETag"]
            assert r.headers["X-Linked-Size"] == str(len(weights)) == r.headers["Content-Length"]
            assert r.headers["X-Repo-Commit"] == h.repos["acme/tiny"].commit
            assert r.headers["X-Naiad-Task-Id"] == f"sha256:{sha}"
        async with s.get(url, headers={"Range": "bytes=1000-1999"}) as r:
            assert r.status == 206 and await r.read() == weights[1000:2000]
        async with s.get(resolve_url(p2.url, "acme/tiny", "config.json")) as r:
            assert r.status == 200 and await r.read() == public["config.json"]  # passed through
            assert r.headers["ETag"] == f'"{git_blob_id(public["config.json"])}"'
        async with s.get(f"{p2.url}/api/models/acme/secret/revision/main") as r:
            assert r.status == 401 and r.headers["X-Error-Code"] == "RepoNotFound"
        async with s.post(url, data=b"x") as r:  # not a download: the hub's own answer
            assert r.status == 405 and "X-Dragonfly-Error-Type" not in r.headers
        async with s.get(f"{p2.url}/acme/tiny/blob/main/config.json") as r:
            assert r.status == 404 and "no such endpoint" in await r.text()  # not the hub's API
    assert cdn.bytes_served == before

    # A private repository: refused without its token, served with it.
    got = await hf_client(p1.url, tmp_path / "home3", "acme/secret", "weights.bin")
    assert "error" in got, got
    assert cdn.bytes_served == before
    got = await hf_client(p1.url, tmp_path / "home4", "acme/secret", "weights.bin",
                          token="hf_right")
    assert Path(got["files"]["weights.bin"]).read_bytes() == secret_weights, got
    assert cdn.bytes_served == before + len(secret_weights)
    # A wrong token at peer 2 gets nothing of peer 1's copy; the right one gets it from peer 1.
    served = await metric(p2.url, "naiad_peer_served_bytes_total")
    got = await hf_client(p2.url, tmp_path / "home5", "acme/secret", "weights.bin",
                          token="hf_wrong")
    assert "error" in got, got
    assert await metric(p2.url, "naiad_peer_served_bytes_total") == served
    assert any(r[2] == "Bearer hf_wrong" for r in h.resolves("weights.bin")), \
        "peer 2 asked the hub with the client's token"
    got = await hf_client(p2.url, tmp_path / "home6", "acme/secret", "weights.bin",
                          token="hf_right")
    assert Path(got["files"]["weights.bin"]).read_bytes() == secret_weights, got
    assert cdn.bytes_served == before + len(secret_weights)

    # naiad get: a whole repository holding the same weights under another name (one task, so
    # no CDN bytes), and one private file with HF_TOKEN.
    out = tmp_path / "copy"
    code, text = await naiad_get("hf://acme/tiny-copy", "-o", str(out), "--peer", p2.url)
    assert code == 0, text
    assert tree(out) == h.repos["acme/tiny-copy"].files
    assert cdn.bytes_served == before + len(secret_weights)
    one = tmp_path / "one"
    code, text = await naiad_get("hf://acme/secret/weights.bin", "-o", str(one), "--peer",
                                 p2.url, "--revision", private.commit,
                                 env={"HF_TOKEN": "hf_right"})
    assert code == 0, text
    assert tree(one) == {"weights.bin": secret_weights}
    code, text = await naiad_get("hf://acme/secret", "-o", str(tmp_path / "no"), "--peer",
                                 p2.url)
    assert code == 1 and "401" in text, text
    assert not (tmp_path / "no" / "weights.bin").exists()
    # The CDN served each LFS file about once, whatever the number of peers and clients.
    assert cdn.bytes_served <= (len(weights) + len(secret_weights)) * 1.1
    assert cdn.refused == 0, "the peer never sent the hub token to the CDN"


def test_naiad_get_hf_refuses_mistakes_before_fetching(tmp_path: Path) -> None:
    from common.config import ConfigError
    from naiad.get import check_hub_args

    peer = "http://127.0.0.1:65001"
    assert check_hub_args("hf://acme/tiny", str(tmp_path / "new"), peer, "main") == \
        hub.HubRef("model", "acme/tiny", None)
    (tmp_path / "file").write_text("x")
    for url, out, peer_url, rev, why in [
        ("hf://acme", str(tmp_path), peer, "main", "owner/repo"),
        ("hf://acme/tiny", str(tmp_path / "file"), peer, "main", "not a directory"),
        ("hf://acme/tiny", str(tmp_path / "no" / "dir"), peer, "main", "no directory"),
        ("hf://acme/tiny", str(tmp_path), "ftp://peer", "main", "--peer"),
        ("hf://acme/tiny", str(tmp_path), peer, "", "--revision"),
    ]:
        with pytest.raises(ConfigError, match=why):
            check_hub_args(url, out, peer_url, rev)
