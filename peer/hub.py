"""Model hubs (Hugging Face and compatible): the pure part, no I/O.

With `HF_ENDPOINT` pointed at a peer, the `huggingface_hub` client sends the peer what it would
send the hub. A file download is `HEAD|GET /[datasets/|spaces/]{repo}/resolve/{revision}/{path}`;
the hub answers an LFS file's metadata HEAD with `X-Linked-Etag` (the file's sha256),
`X-Linked-Size`, `X-Repo-Commit` and a redirect to a signed CDN URL. Such a file is a task named
by its sha256, so the same file in two repositories or revisions is one task and its whole-blob
sha256 is checked like an OCI blob's. Everything else (the API, small files kept in git) is the
hub's to answer.

Also here: `hf://[datasets/|spaces/]owner/repo[/path]` for `naiad get`, and what a downloaded
file is checked against (an LFS file's sha256, a git file's blob sha1).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote, unquote

DEFAULT_HUB = "https://huggingface.co"
# URL prefixes of repository kinds (models have none), as huggingface_hub writes them.
KINDS = {"datasets": "dataset", "spaces": "space"}
PREFIXES = {kind: prefix for prefix, kind in KINDS.items()}
# What the client reads from a metadata HEAD (huggingface_hub.file_download.get_hf_file_metadata).
METADATA_HEADERS = ("X-Repo-Commit", "X-Linked-Etag", "X-Linked-Size", "ETag")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # an owner or a repository name


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of one revision of a repository, as a resolve URL names it."""

    kind: str  # model, dataset or space
    repo: str  # owner/name (or a legacy one-part name)
    revision: str
    path: str


@dataclass(frozen=True, slots=True)
class LfsFile:
    """What the hub's metadata answer says of an LFS file."""

    sha256: str  # lowercase hex
    size: int

    @property
    def task_id(self) -> str:
        return f"sha256:{self.sha256}"


def parse_resolve(raw_path: str) -> HubFile | None:
    """The file a (percent-encoded) request path names, or None when it is no resolve path."""
    segments = raw_path.split("/")
    if len(segments) < 2 or segments[0] != "":
        return None
    rest = segments[1:]
    kind = "model"
    if rest[0] in KINDS:
        kind, rest = KINDS[rest[0]], rest[1:]
    # owner/name is the norm; a one-part name (gpt2) is legacy.
    for parts in (2, 1):
        if len(rest) >= parts + 3 and rest[parts] == "resolve" \
                and all(_SEGMENT.match(s) for s in rest[:parts]):
            revision = unquote(rest[parts + 1])
            path = unquote("/".join(rest[parts + 2:]))
            if revision and path and not path.endswith("/"):
                return HubFile(kind, "/".join(rest[:parts]), revision, path)
    return None


def is_api_path(path: str) -> bool:
    """The hub's API (`/api/...`): passed to the hub unchanged."""
    return path == "/api" or path.startswith("/api/")


def normalize_etag(value: str | None) -> str | None:
    """An ETag without its weak marker and quotes, as huggingface_hub compares them."""
    if not value:
        return None
    return value.strip().removeprefix("W/").strip('"') or None


def lfs_file(status: int, headers: Mapping[str, str]) -> LfsFile | None:
    """The LFS file a metadata answer describes, or None: a refusal, a missing file, or a small
    file kept in git (no `X-Linked-Etag`), all of which are the hub's to answer."""
    if status >= 400:
        return None
    sha = (normalize_etag(headers.get("X-Linked-Etag")) or "").lower()
    size = (headers.get("X-Linked-Size") or "").strip()
    if not _SHA256.match(sha) or not size.isdigit():
        return None
    return LfsFile(sha, int(size))


def client_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The hub's metadata headers for the client, and nothing that would send it elsewhere: no
    `Location` (the peer follows the redirect itself) and no Xet headers (they would make
    the client fetch from Xet storage around the peer)."""
    return {name: headers[name] for name in METADATA_HEADERS if name in headers}


def resolve_path(kind: str, repo: str, revision: str, path: str) -> str:
    """The request path of a file, encoded as huggingface_hub.hf_hub_url encodes it."""
    return f"/{_prefix(kind)}{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"


def revision_api_path(kind: str, repo: str, revision: str) -> str:
    """The API call listing a revision's files (`siblings`) and its commit (`sha`)."""
    return f"/api/{kind}s/{repo}/revision/{quote(revision, safe='')}"


def _prefix(kind: str) -> str:
    return f"{PREFIXES[kind]}/" if kind in PREFIXES else ""


class BadHubUrl(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class HubRef:
    """`hf://[datasets/|spaces/]owner/repo[/path]`: a whole repository, or one file of it."""

    kind: str
    repo: str
    path: str | None


def parse_hf_url(url: str) -> HubRef:
    if not url.startswith("hf://"):
        raise BadHubUrl(f"not an hf:// URL: {url!r}")
    rest = [s for s in url.removeprefix("hf://").split("/")]
    kind = "model"
    if rest and rest[0] in KINDS:
        kind, rest = KINDS[rest[0]], rest[1:]
    elif rest and rest[0] == "models":
        rest = rest[1:]
    if len(rest) < 2 or not all(_SEGMENT.match(s) for s in rest[:2]):
        raise BadHubUrl(f"expected hf://[datasets/|spaces/]owner/repo[/path], got {url!r}")
    path = "/".join(rest[2:]) or None
    if path is not None:
        path = safe_relpath(path)
    return HubRef(kind, "/".join(rest[:2]), path)


def safe_relpath(path: str) -> str:
    """A repository file's path, refused when it could leave the output directory."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")) \
            or "\\" in path or "\0" in path:
        raise BadHubUrl(f"unsafe file path in the repository: {path[:200]!r}")
    return str(p)


@dataclass(frozen=True, slots=True)
class Expected:
    """What a downloaded file is checked against: an LFS file's sha256, or a git file's blob
    id (`git-sha1`: sha1 of `blob <size>\\0` and the content, the ETag the hub gives files
    kept in git)."""

    algorithm: str  # sha256 or git-sha1
    hexdigest: str


def expected_digest(headers: Mapping[str, str]) -> Expected | None:
    """From the answer to a file GET: the LFS sha256, else a 40-hex ETag as the git blob id,
    else nothing to check against."""
    lfs = (normalize_etag(headers.get("X-Linked-Etag")) or "").lower()
    if _SHA256.match(lfs):
        return Expected("sha256", lfs)
    etag = (normalize_etag(headers.get("ETag")) or "").lower()
    if _SHA1.match(etag):
        return Expected("git-sha1", etag)
    return None


def git_blob_hasher(size: int) -> hashlib._Hash:
    """A hasher that, fed a file's `size` bytes, gives its git blob id."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {size}\0".encode())
    return h
