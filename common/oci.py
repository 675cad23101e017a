"""OCI image references and manifests, without I/O: what `naiad preheat` resolves.

A reference is `host[:port]/repo[:tag|@digest]` (https), `http://host:port/repo:tag` (a
plain-http registry), or a Docker Hub short name (`library/alpine`, `alpine:3`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from common import ids

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = frozenset(MANIFEST_TYPES[:2])
DOCKER_HUB = "registry-1.docker.io"
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
                      r"(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")


class InvalidReference(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ImageRef:
    scheme: str
    host: str
    repo: str
    reference: str  # a tag or a digest

    @property
    def registry(self) -> str:
        return f"{self.scheme}://{self.host}"

    def manifest_url(self, reference: str | None = None) -> str:
        return f"{self.registry}/v2/{self.repo}/manifests/{reference or self.reference}"

    def blob_url(self, digest: str) -> str:
        return f"{self.registry}/v2/{self.repo}/blobs/{digest}"


def parse_reference(text: str) -> ImageRef:
    text = text.strip()
    scheme = "https"
    for prefix in ("http://", "https://"):
        if text.startswith(prefix):
            scheme, text = prefix[:-3], text[len(prefix):]
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = DOCKER_HUB, text
        if "/" not in path:
            path = "library/" + path
    if "@" in path:
        repo, _, reference = path.partition("@")
        ids.parse_blob_digest(reference)
    else:
        repo, _, tag = path.rpartition(":") if ":" in path else (path, "", "latest")
        reference = tag
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
    if not _REPO_RE.fullmatch(repo) or len(repo) > 255:
        raise InvalidReference(f"invalid repository {repo!r}")
    return ImageRef(scheme, host, repo, reference)


@dataclass(frozen=True, slots=True)
class Blob:
    digest: str
    size: int


def manifest_blobs(document: bytes) -> list[Blob]:
    """The config and layers a single-platform manifest names."""
    doc = json.loads(document)
    out = [doc["config"], *doc.get("layers", [])]
    return [Blob(ids.parse_blob_digest(d["digest"]), int(d["size"])) for d in out]


def pick_platform(document: bytes, os: str = "linux", arch: str = "amd64") -> str | None:
    """The digest of the manifest for a platform in an index / manifest list."""
    doc = json.loads(document)
    for m in doc.get("manifests", []):
        p = m.get("platform", {})
        if p.get("os") == os and p.get("architecture") == arch:
            return ids.parse_blob_digest(m["digest"])
    return None


def is_index(media_type: str, document: bytes) -> bool:
    if media_type.split(";")[0].strip() in INDEX_TYPES:
        return True
    try:
        return "manifests" in json.loads(document)
    except ValueError:
        return False
