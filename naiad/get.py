"""`naiad get URL -o FILE`: fetch one blob or file through a peer, like dfget.

A registry blob URL (`…/v2/<repo>/blobs/sha256:…`) goes through the peer's mirror with the
registry named in `X-Dragonfly-Registry`, and is checked against its digest; any other URL goes
through `/download`, checked against `--digest` when given. The file appears only complete and
verified: bytes land in `FILE.part` and are renamed at the end.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import aiohttp

from common.config import ConfigError
from common.sizes import format_size

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


async def get(url: str, output: str, peer: str, digest: str | None = None,
              progress: bool | None = None) -> dict[str, str | int]:
    target, headers, expected = mirror_request(url, peer, digest)
    out = Path(output)
    part = out.with_name(out.name + ".part")
    hasher = hashlib.sha256()
    show = sys.stderr.isatty() if progress is None else progress
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.get(target, headers=headers) as resp:
        if resp.status != 200:
            body = (await resp.text())[:500]
            raise GetError(f"peer answered {resp.status}: {body}")
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
        if expected and got != expected:
            part.unlink(missing_ok=True)
            raise GetError(f"digest mismatch: expected {expected}, got {got}")
        os.replace(part, out)
        return {"bytes": bar.done, "digest": got,
                "source": resp.headers.get("X-Naiad-Source", "?"),
                "task": resp.headers.get("X-Naiad-Task-Id", "?")}
