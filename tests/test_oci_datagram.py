"""Pure cores of preheat (image references, manifests) and of UDP heartbeats (datagrams)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import datagram
from common.models import Heartbeat, PeerCounters, PeerLoad
from common.oci import (
    ImageRef,
    InvalidReference,
    is_index,
    manifest_blobs,
    parse_reference,
    pick_platform,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("alpine", ImageRef("https", "registry-1.docker.io", "library/alpine", "latest")),
    ("alpine:3.19", ImageRef("https", "registry-1.docker.io", "library/alpine", "3.19")),
    ("bitnami/redis:7", ImageRef("https", "registry-1.docker.io", "bitnami/redis", "7")),
    ("ghcr.io/org/app:v1", ImageRef("https", "ghcr.io", "org/app", "v1")),
    ("127.0.0.1:5000/team/app", ImageRef("https", "127.0.0.1:5000", "team/app", "latest")),
    ("http://127.0.0.1:5000/team/app:v2", ImageRef("http", "127.0.0.1:5000", "team/app", "v2")),
    ("localhost/app:x", ImageRef("https", "localhost", "app", "x")),
    (f"ghcr.io/org/app@{D}", ImageRef("https", "ghcr.io", "org/app", D)),
])
def test_parse_reference(text: str, expected: ImageRef) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", ["ghcr.io/Org/app", "ghcr.io/org/app:", "ghcr.io/org/app:-x",
                                  "ghcr.io/org/app@sha256:xyz", "ghcr.io/", "a" * 300,
                                  "ghcr.io/org//app:1"])
def test_bad_references(text: str) -> None:
    with pytest.raises(ValueError):
        parse_reference(text)
    assert issubclass(InvalidReference, ValueError)


def test_urls() -> None:
    ref = parse_reference("http://r:5000/a/b:t")
    assert ref.manifest_url() == "http://r:5000/v2/a/b/manifests/t"
    assert ref.blob_url(D) == f"http://r:5000/v2/a/b/blobs/{D}"


def test_manifest_blobs_and_platform() -> None:
    manifest = json.dumps({"config": {"digest": D, "size": 10},
                           "layers": [{"digest": "sha256:" + "cd" * 32, "size": 20}]}).encode()
    assert [(b.digest, b.size) for b in manifest_blobs(manifest)] == [
        (D, 10), ("sha256:" + "cd" * 32, 20)]
    index = json.dumps({"manifests": [
        {"digest": "sha256:" + "11" * 32, "platform": {"os": "linux", "architecture": "arm64"}},
        {"digest": "sha256:" + "22" * 32, "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode()
    assert pick_platform(index) == "sha256:" + "22" * 32
    assert pick_platform(index, arch="s390x") is None
    assert is_index("application/vnd.oci.image.index.v1+json", index)
    assert is_index("application/json", index)
    assert not is_index("application/vnd.oci.image.manifest.v1+json", manifest)


HB = Heartbeat(load=PeerLoad(active_uploads=2, upload_rate=1.5, free_disk=10**12),
               counters=PeerCounters(origin=5, peer=6, local=7, served=8, uploaded=9,
                                     started_at=1234.5))


@pytest.mark.parametrize("secret", [None, b"s3cret"])
def test_datagram_round_trip(secret: bytes | None) -> None:
    data = datagram.encode("peer-1", HB, secret, now=1000, nonce="ab" * 16)
    assert len(data) <= datagram.MAX_DATAGRAM
    assert datagram.decode(data, secret, now=1000) == ("peer-1", HB, 1000, "ab" * 16)
    # Every datagram has a nonce of its own, inside the signature: a replay is recognisable.
    again = datagram.encode("peer-1", HB, secret, now=1000)
    assert datagram.decode(again, secret, now=1000).nonce not in ("ab" * 16, "")


def test_datagram_refusals() -> None:
    good = datagram.encode("peer-1", HB, b"k", now=1000)
    payload = good.rpartition(b"\n")[0]
    cases = [
        good[:-1] + (b"1" if good.endswith(b"0") else b"0"),  # tampered signature
        payload + b"\n",  # unsigned, secret expected
        datagram.encode("peer-1", HB, b"other", now=1000),  # signed with another secret
        good.replace(b'"peer-1"', b'"peer-2"'),  # spoofed id: signature breaks
        good.replace(b'"n":"', b'"n":"0'),  # another nonce: signature breaks
        b"x" * (datagram.MAX_DATAGRAM + 1),
        b"",
    ]
    for data in cases:
        with pytest.raises(datagram.DatagramError):
            datagram.decode(data, b"k", now=1000)
    with pytest.raises(datagram.DatagramError):
        datagram.decode(good, b"k", now=1000 + datagram.MAX_SKEW_SECONDS + 1)
    unsigned = datagram.encode("peer-1", HB, None, now=1000)
    n = '"n":"' + "ab" * 16 + '"'
    for payload in (b"[1,2]", b'{"v":2}', b'{"v":2,"id":"../x","ts":1000,"hb":{}}',
                    b'{"v":2,"id":"p","ts":true,"hb":{}}',
                    f'{{"v":2,"id":"p","ts":1000,{n},"hb":{{"load":{{"active_uploads":-1}}}}}}'
                    .encode(),
                    b'{"v":1,"id":"p","ts":1000,"hb":{}}',  # before nonces: refused
                    b'{"v":2,"id":"p","ts":1000,"hb":{}}',  # no nonce
                    b'{"v":2,"id":"p","ts":1000,"n":"xyz","hb":{}}',
                    b'{"v":2,"id":"p","ts":1000,"n":7,"hb":{}}',
                    b"\xff\xfe"):
        with pytest.raises(datagram.DatagramError):
            datagram.decode(payload + b"\n", None, now=1000)
    assert datagram.decode(unsigned, None, now=1000)[0] == "peer-1"


@given(st.binary(max_size=2000))
def test_random_datagrams_never_raise_anything_else(data: bytes) -> None:
    for secret in (None, b"k"):
        with contextlib.suppress(datagram.DatagramError):
            datagram.decode(data, secret, now=1000)
