"""Task and chunk identity: what names a blob, a URL and a chunk of bytes.

A task is one blob. An OCI blob is named by its digest, so the same layer pulled through two
registries or tags is one task. Any other URL is named by the sha256 of the URL without the query
parameters that presigned object-store URLs change on every request.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import blake3

SHA256_PREFIX = "sha256:"
BLAKE3_PREFIX = "blake3:"
URL_TASK_PREFIX = "url:"

_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_BLAKE3_RE = re.compile(r"^blake3:[0-9a-f]{64}$")
_URL_TASK_RE = re.compile(r"^url:[0-9a-f]{64}$")

# Query parameters of S3 (v2 and v4), GCS, Azure SAS, Alibaba OSS and Tencent COS presigned URLs.
# Matched case-insensitively; a parameter with one of the prefixes is a signature parameter too.
_SIGNATURE_PARAMS = frozenset(
    p.lower()
    for p in (
        "Signature", "Expires", "AWSAccessKeyId", "GoogleAccessId", "OSSAccessKeyId",
        "security-token", "sig", "se", "st", "sp", "sv", "sr", "ss", "srt", "spr", "skoid",
        "sktid", "skt", "ske", "sks", "skv", "sdd", "sip", "saoid", "suoid", "scid",
        "q-sign-algorithm", "q-ak", "q-sign-time", "q-key-time", "q-header-list",
        "q-url-param-list", "q-signature",
    )
)
_SIGNATURE_PREFIXES = ("x-amz-", "x-goog-", "x-oss-", "x-cos-")

# Large pieces hash faster with blake3's own threads; small ones are not worth the hand-off.
_THREADED_HASH_MIN = 4 << 20


class InvalidIdentifier(ValueError):
    """A digest, chunk id or task id that is not well formed."""


def is_blob_digest(value: str) -> bool:
    return bool(_SHA256_RE.fullmatch(value))


def parse_blob_digest(value: str) -> str:
    """Return `value` if it is a `sha256:<64 hex>` digest, else raise InvalidIdentifier."""
    if not _SHA256_RE.fullmatch(value):
        raise InvalidIdentifier(f"not a sha256 digest: {value[:80]!r}")
    return value


def parse_chunk_id(value: str) -> str:
    if not _BLAKE3_RE.fullmatch(value):
        raise InvalidIdentifier(f"not a blake3 chunk id: {value[:80]!r}")
    return value


def parse_task_id(value: str) -> str:
    if not (_SHA256_RE.fullmatch(value) or _URL_TASK_RE.fullmatch(value)):
        raise InvalidIdentifier(f"not a task id: {value[:80]!r}")
    return value


def is_signature_param(name: str) -> bool:
    low = name.lower()
    return low in _SIGNATURE_PARAMS or low.startswith(_SIGNATURE_PREFIXES)


def strip_signature(url: str) -> str:
    """The URL without presigned-URL parameters and fragment, other parameters kept in order."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if not is_signature_param(k)]
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path,
                       urlencode(query), ""))


def task_id_for_url(url: str) -> str:
    return URL_TASK_PREFIX + hashlib.sha256(strip_signature(url).encode()).hexdigest()


def chunk_id(data: bytes | memoryview) -> str:
    """The content address of a piece: `blake3:<hex>` of its bytes."""
    if len(data) >= _THREADED_HASH_MIN:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    else:
        hasher = blake3.blake3()
    hasher.update(data)
    return BLAKE3_PREFIX + hasher.hexdigest()


def sha256_hex(digest: str) -> str:
    return parse_blob_digest(digest)[len(SHA256_PREFIX):]
