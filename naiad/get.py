"""`naiad get URL -o FILE`: fetch one blob or file through a peer, like dfget.

A registry blob URL (`…/v2/<repo>/blobs/sha256:…`) goes through the peer's mirror with the
registry named in `X-Dragonfly-Registry`, and is checked against its digest; any other URL goes
through `/download`, checked against `--digest` when given. The file appears only complete and
verified: bytes land in `FILE.part` and are renamed at the end.

`naiad get hf://[datasets/|spaces/]owner/repo[/path] -o DIR` fetches a model hub repository (or
one file of it) through the peer's hub front, as a plain tree: `DIR/<path in the repository>`.
The revision's file list comes from the hub's API (`/api/models/{repo}/revision/{rev}`), each
file from `/{repo}/resolve/{commit}/{path}`, checked against its LFS sha256 or its git blob id;
`HF_TOKEN` is sent as the bearer token for private repositories.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import aiohttp

from common.config import ConfigError
from common.sizes import format_size
from peer import hub

_BLOB_URL = re.compile(r"^(https?)://([^/]+)/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class GetError(Exception):
    pass


def check_args(url: str, output: str, peer: str, digest: str | None) -> None:
    """The user's mistakes, refused before anything is fetched (ConfigError: exit status 2)."""
    for what, value in (("URL", url), ("--peer", peer)):
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{what} {value!r} is not an http(s) URL")
    if digest is not None and not _DIGEST.match(digest):
        raise ConfigError(f"--digest {digest!r} is not sha256:<64 hex digits>")
    out = Path(output)
    parent = out.parent
    if out.is_dir():
        raise ConfigError(f"-o {output}: is a directory")
    if not parent.is_dir():
        raise ConfigError(f"-o {output}: no directory {parent}")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"-o {output}: cannot write in {parent}")


def mirror_request(url: str, peer: str, digest: str | None) -> tuple[str, dict[str, str],
                                                                      str | None]:
    """The URL to ask the peer for, the headers to send, and the digest to check."""
    peer = peer.rstrip("/")
    m = _BLOB_URL.match(url)
    if m:
        scheme, host, repo, blob_digest = m.groups()
        if digest and digest != blob_digest:
            raise GetError(f"--digest {digest} contradicts the URL's {blob_digest}")
        return (f"{peer}/v2/{repo}/blobs/{blob_digest}",
                {"X-Dragonfly-Registry": f"{scheme}://{host}"}, blob_digest)
    query = {"url": url} | ({"digest": digest} if digest else {})
    return f"{peer}/download?{urlencode(query)}", {}, digest


class Progress:
    def __init__(self, total: int | None, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.started, 1e-6)
            if self.total:
                width = 30
                filled = int(width * self.done / self.total)
                bar = "#" * filled + "-" * (width - filled)
                text = (f"\r[{bar}] {100 * self.done / self.total:5.1f}% "
                        f"{format_size(self.done)}/{format_size(self.total)} "
                        f"{format_size(rate)}/s")
            else:
                text = f"\r{format_size(self.done)} {format_size(rate)}/s"
            sys.stderr.write(text)
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
Check = Callable[[aiohttp.ClientResponse], hub.Expected | None]


async def get(url: str, output: str, peer: str, digest: str | None = None,
              progress: bool | None = None) -> dict[str, str | int]:
    target, headers, expected = mirror_request(url, peer, digest)
    check = hub.Expected("sha256", expected.removeprefix("sha256:")) if expected else None
    show = sys.stderr.isatty() if progress is None else progress
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        return await _download(session, target, headers, Path(output), show,
                               lambda _: check)


async def _download(session: aiohttp.ClientSession, target: str, headers: dict[str, str],
                    out: Path, show: bool, check: Check) -> dict[str, str | int]:
    """Stream `target` into `out` (by way of `out.part`, renamed once verified against what
    `check` says of the answer)."""
    part = out.with_name(out.name + ".part")
    hasher = hashlib.sha256()
    async with session.get(target, headers=headers) as resp:
        if resp.status != 200:
            body = (await resp.text())[:500]
            raise GetError(f"peer answered {resp.status}: {body}")
        expected = check(resp)
        bar = Progress(resp.content_length, show)
        try:
            with open(part, "wb") as f:  # noqa: ASYNC230 - a one-shot CLI, no other work
                async for chunk in resp.content.iter_chunked(1 << 20):
                    f.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
        except aiohttp.ClientPayloadError as e:
            part.unlink(missing_ok=True)
            raise GetError(f"the peer aborted the transfer (a piece or the whole blob failed "
                           f"verification, or the peer failed); nothing written: {e}") from e
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        finally:
            bar.finish()
        got = "sha256:" + hasher.hexdigest()
        if expected is not None:
            have = hasher.hexdigest() if expected.algorithm == "sha256" \
                else _git_blob_id(part, bar.done)
            if have != expected.hexdigest:
                part.unlink(missing_ok=True)
                raise GetError(f"digest mismatch for {out.name}: expected {expected.algorithm}:"
                               f"{expected.hexdigest}, got {expected.algorithm}:{have}")
        os.replace(part, out)
        return {"bytes": bar.done, "digest": got,
                "source": resp.headers.get("X-Naiad-Source", "?"),
                "task": resp.headers.get("X-Naiad-Task-Id", "?")}


def _git_blob_id(path: Path, size: int) -> str:
    """A small file kept in git, hashed again as git names it (read back: its size, needed
    first, is only known once it is all here)."""
    h = hub.git_blob_hasher(size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_hub_args(url: str, output: str, peer: str, revision: str) -> hub.HubRef:
    """`naiad get hf://...`'s mistakes, refused before anything is fetched."""
    try:
        ref = hub.parse_hf_url(url)
    except hub.BadHubUrl as e:
        raise ConfigError(str(e)) from None
    parts = urlsplit(peer)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--peer {peer!r} is not an http(s) URL")
    if not revision or "\0" in revision:
        raise ConfigError("--revision must not be empty")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {output}: not a directory (hf:// writes a tree of files)")
    if not out.parent.is_dir():
        raise ConfigError(f"-o {output}: no directory {out.parent}")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise ConfigError(f"-o {output}: cannot write there")
    return ref


async def get_hub(ref: hub.HubRef, output: str, peer: str, revision: str = "main",
                  token: str | None = None,
                  progress: bool | None = None) -> dict[str, str | int]:
    """A repository's files at `revision` (or the one file `ref` names) under `output`."""
    peer = peer.rstrip("/")
    headers = {"Accept-Encoding": "identity"}  # the bytes as the hub has them
    if token:
        headers["Authorization"] = f"Bearer {token}"
    show = sys.stderr.isatty() if progress is None else progress
    root = Path(output)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        commit, files = revision, [ref.path] if ref.path else []
        if ref.path is None:
            commit, files = await _listing(session, peer, ref, revision, headers)
        total, sources = 0, set()
        for name in files:
            out = root / name
            out.parent.mkdir(parents=True, exist_ok=True)
            if show:
                sys.stderr.write(f"{name}\n")
            result = await _download(
                session, peer + hub.resolve_path(ref.kind, ref.repo, commit, name), headers,
                out, show, lambda resp: hub.expected_digest(resp.headers))
            total += int(result["bytes"])
            sources.add(str(result["source"]))
    return {"files": len(files), "bytes": total, "commit": commit,
            "source": ",".join(sorted(sources)) or "-"}


async def _listing(session: aiohttp.ClientSession, peer: str, ref: hub.HubRef, revision: str,
                   headers: dict[str, str]) -> tuple[str, list[str]]:
    """The revision's commit and its files, from the hub's API (passed through the peer)."""
    url = peer + hub.revision_api_path(ref.kind, ref.repo, revision)
    async with session.get(url, headers=headers) as resp:
        if resp.status != 200:
            raise GetError(f"{ref.repo}@{revision}: the hub answered {resp.status}: "
                           f"{(await resp.text())[:300]}")
        try:
            info = await resp.json(content_type=None)
            names = [s["rfilename"] for s in info.get("siblings") or []]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise GetError(f"{ref.repo}@{revision}: the hub's answer has no file list: "
                           f"{e!r}") from None
    try:
        files = [hub.safe_relpath(n) for n in names if isinstance(n, str)]
    except hub.BadHubUrl as e:
        raise GetError(f"{ref.repo}@{revision}: {e}") from None
    sha = info.get("sha")
    return (sha if isinstance(sha, str) and sha else revision), files
