"""Unit tests for common/ids.py: digests, chunk ids, task ids and presigned-URL normalisation."""

from __future__ import annotations

import hashlib

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import ids
from common.ids import (
    InvalidIdentifier,
    chunk_id,
    is_blob_digest,
    is_signature_param,
    parse_blob_digest,
    parse_chunk_id,
    parse_task_id,
    sha256_hex,
    strip_signature,
    task_id_for_url,
)

HEX = "0123456789abcdef" * 4
assert len(HEX) == 64

GOOD_DIGESTS = ["sha256:" + HEX, "sha256:" + "0" * 64, "sha256:" + "f" * 64]
BAD_DIGESTS = [
    "",
    "sha256:",
    HEX,  # no algorithm
    "sha256:" + HEX[:-1],  # 63 hex
    "sha256:" + HEX + "0",  # 65 hex
    "sha256:" + HEX.upper(),  # OCI digests are lower-case hex
    "SHA256:" + HEX,
    "sha512:" + HEX,
    "sha256:" + HEX[:-1] + "g",
    "sha256: " + HEX[1:],
    " sha256:" + HEX,
    "sha256:" + HEX + " ",
    "sha256-" + HEX,
    "blake3:" + HEX,
    "url:" + HEX,
    "sha256:" + HEX + "/../x",
]


@pytest.mark.parametrize("value", GOOD_DIGESTS)
def test_blob_digest_accepted(value: str) -> None:
    assert is_blob_digest(value)
    assert parse_blob_digest(value) == value
    assert parse_task_id(value) == value
    assert sha256_hex(value) == value.removeprefix("sha256:")


@pytest.mark.parametrize("value", BAD_DIGESTS)
def test_blob_digest_rejected(value: str) -> None:
    assert not is_blob_digest(value)
    with pytest.raises(InvalidIdentifier):
        parse_blob_digest(value)
    with pytest.raises(InvalidIdentifier):
        sha256_hex(value)


def test_invalid_identifier_is_a_value_error() -> None:
    assert issubclass(InvalidIdentifier, ValueError)


def test_error_message_is_bounded() -> None:
    with pytest.raises(InvalidIdentifier) as info:
        parse_blob_digest("x" * 100_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("value", ["blake3:" + HEX, "blake3:" + "a" * 64])
def test_chunk_id_accepted(value: str) -> None:
    assert parse_chunk_id(value) == value


@pytest.mark.parametrize("value", [
    "", "blake3:", "blake3:" + HEX[:-1], "blake3:" + HEX + "0", "blake3:" + HEX.upper(),
    "BLAKE3:" + HEX, "sha256:" + HEX, HEX, "blake3:" + HEX[:-1] + "z", "blake3:" + HEX + "/",
])
def test_chunk_id_rejected(value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        parse_chunk_id(value)


@pytest.mark.parametrize("value", ["sha256:" + HEX, "url:" + HEX])
def test_task_id_accepted(value: str) -> None:
    assert parse_task_id(value) == value


@pytest.mark.parametrize("value", [
    "", "url:", "url:" + HEX[:-1], "url:" + HEX.upper(), "URL:" + HEX, "blake3:" + HEX,
    "url:https://example.com/x", "http:" + HEX, "sha256:" + HEX[:-1],
])
def test_task_id_rejected(value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        parse_task_id(value)


@pytest.mark.parametrize(("parse", "value"), [
    (parse_blob_digest, "sha256:" + HEX + "\n"),
    (parse_chunk_id, "blake3:" + HEX + "\n"),
    (parse_task_id, "url:" + HEX + "\n"),
])
def test_trailing_newline_is_rejected(parse, value: str) -> None:
    with pytest.raises(InvalidIdentifier):
        parse(value)


# --- presigned URLs ---------------------------------------------------------------------------

BASE = "https://bucket.example.com/path/to/layer.tar.gz"

# Each entry: two presigned URLs for the same object that differ only in signature parameters.
PRESIGNED = {
    "s3-v4": (
        BASE + "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=tok1&X-Amz-Signature=" + "a" * 64,
        BASE + "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAOTHER%2F20240202%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240202T121212Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host"
        "&X-Amz-Security-Token=tok2&X-Amz-Signature=" + "b" * 64,
    ),
    "s3-v2": (
        BASE + "?AWSAccessKeyId=AKIAEXAMPLE&Signature=abc%2Bdef%3D&Expires=1700000000",
        BASE + "?AWSAccessKeyId=AKIAOTHER&Expires=1800000000&Signature=xyz%2F123%3D"
               "&x-amz-security-token=tok",
    ),
    "gcs-v4": (
        BASE + "?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam.gserviceaccount"
               ".com%2F20240101%2Fauto%2Fstorage%2Fgoog4_request&X-Goog-Date=20240101T000000Z"
               "&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature=" + "c" * 64,
        BASE + "?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=other%40p.iam.gservice"
               "account.com%2F20240303%2Fauto%2Fstorage%2Fgoog4_request"
               "&X-Goog-Date=20240303T000000Z&X-Goog-Expires=60&X-Goog-SignedHeaders=host"
               "&X-Goog-Signature=" + "d" * 64,
    ),
    "gcs-v2": (
        BASE + "?GoogleAccessId=sa%40p.iam.gserviceaccount.com&Expires=1700000000"
               "&Signature=AbC%2Bd%3D",
        BASE + "?GoogleAccessId=other%40p.iam.gserviceaccount.com&Expires=1800000000"
               "&Signature=XyZ%2Fq%3D",
    ),
    "azure-sas": (
        BASE + "?sv=2022-11-02&ss=b&srt=o&sp=r&se=2024-01-01T00:00:00Z"
               "&st=2023-12-31T00:00:00Z&spr=https&sr=b&sig=abc%2Bdef%3D",
        BASE + "?sv=2023-01-03&ss=bf&srt=sco&sp=rl&se=2025-06-01T00:00:00Z"
               "&st=2025-05-31T00:00:00Z&spr=https,http&sr=c&sig=zzz%2Fyyy%3D",
    ),
    "azure-user-delegation": (
        BASE + "?sv=2022-11-02&sr=b&sp=r&se=2024-01-01T00:00:00Z&skoid=o1&sktid=t1"
               "&skt=2024-01-01T00:00:00Z&ske=2024-01-02T00:00:00Z&sks=b&skv=2022-11-02"
               "&sdd=1&sig=one",
        BASE + "?sv=2022-11-02&sr=b&sp=r&se=2024-02-01T00:00:00Z&skoid=o2&sktid=t2"
               "&skt=2024-02-01T00:00:00Z&ske=2024-02-02T00:00:00Z&sks=b&skv=2022-11-02"
               "&sdd=1&sig=two",
    ),
    "oss-v1": (
        BASE + "?OSSAccessKeyId=LTAIexample&Expires=1700000000&Signature=abc%3D"
               "&security-token=tok1",
        BASE + "?OSSAccessKeyId=LTAIother&Expires=1800000000&Signature=xyz%3D",
    ),
    "oss-v4": (
        BASE + "?x-oss-signature-version=OSS4-HMAC-SHA256&x-oss-credential=a%2Fb"
               "&x-oss-date=20240101T000000Z&x-oss-expires=3600&x-oss-signature=" + "e" * 64,
        BASE + "?x-oss-signature-version=OSS4-HMAC-SHA256&x-oss-credential=c%2Fd"
               "&x-oss-date=20240202T000000Z&x-oss-expires=60&x-oss-signature=" + "f" * 64,
    ),
    "cos": (
        BASE + "?q-sign-algorithm=sha1&q-ak=AKIDexample&q-sign-time=1700000000%3B1700003600"
               "&q-key-time=1700000000%3B1700003600&q-header-list=host&q-url-param-list="
               "&q-signature=" + "1" * 40,
        BASE + "?q-sign-algorithm=sha1&q-ak=AKIDother&q-sign-time=1800000000%3B1800003600"
               "&q-key-time=1800000000%3B1800003600&q-header-list=host%3Brange"
               "&q-url-param-list=&q-signature=" + "2" * 40 + "&x-cos-security-token=tok",
    ),
}


@pytest.mark.parametrize("name", sorted(PRESIGNED))
def test_same_object_same_task_id(name: str) -> None:
    a, b = PRESIGNED[name]
    assert a != b
    assert strip_signature(a) == strip_signature(b) == BASE
    assert task_id_for_url(a) == task_id_for_url(b) == task_id_for_url(BASE)


@pytest.mark.parametrize("name", sorted(PRESIGNED))
def test_non_signature_param_changes_task_id(name: str) -> None:
    a, _ = PRESIGNED[name]
    with_version = a.replace("?", "?versionId=1&", 1)
    other_version = a.replace("?", "?versionId=2&", 1)
    assert task_id_for_url(with_version) != task_id_for_url(a)
    assert task_id_for_url(with_version) != task_id_for_url(other_version)
    assert strip_signature(with_version) == BASE + "?versionId=1"


@pytest.mark.parametrize("name", sorted(PRESIGNED))
def test_path_changes_task_id(name: str) -> None:
    a, _ = PRESIGNED[name]
    other = a.replace("layer.tar.gz", "layer2.tar.gz")
    assert task_id_for_url(other) != task_id_for_url(a)
    other_host = a.replace("bucket.example.com", "bucket2.example.com")
    assert task_id_for_url(other_host) != task_id_for_url(a)


def test_task_id_is_sha256_of_the_stripped_url() -> None:
    url = BASE + "?part=3&X-Amz-Signature=abc"
    expected = "url:" + hashlib.sha256((BASE + "?part=3").encode()).hexdigest()
    assert task_id_for_url(url) == expected
    assert parse_task_id(task_id_for_url(url)) == expected


def test_scheme_and_host_are_case_insensitive_path_is_not() -> None:
    assert task_id_for_url("HTTPS://Bucket.Example.COM/a") == task_id_for_url(
        "https://bucket.example.com/a")
    assert task_id_for_url("https://bucket.example.com/A") != task_id_for_url(
        "https://bucket.example.com/a")


def test_scheme_and_port_distinguish_tasks() -> None:
    assert task_id_for_url("http://h/a") != task_id_for_url("https://h/a")
    assert task_id_for_url("https://h:8443/a") != task_id_for_url("https://h/a")


def test_fragment_is_dropped() -> None:
    assert strip_signature(BASE + "#frag") == BASE
    assert task_id_for_url(BASE + "?a=1#x") == task_id_for_url(BASE + "?a=1#y")


def test_other_parameters_kept_in_order() -> None:
    url = BASE + "?b=2&X-Amz-Date=x&a=1&sig=s&c=3"
    assert strip_signature(url) == BASE + "?b=2&a=1&c=3"
    # order is significant: a server may read repeated or ordered parameters
    assert task_id_for_url(BASE + "?a=1&b=2") != task_id_for_url(BASE + "?b=2&a=1")


def test_blank_and_repeated_parameters_kept() -> None:
    assert strip_signature(BASE + "?a=&a=2&Signature=x") == BASE + "?a=&a=2"


@pytest.mark.parametrize("name", [
    "X-Amz-Signature", "x-amz-signature", "X-AMZ-DATE", "X-Amz-Anything", "X-Goog-Expires",
    "x-oss-signature", "x-cos-security-token", "Signature", "signature", "Expires",
    "AWSAccessKeyId", "GoogleAccessId", "OSSAccessKeyId", "security-token", "sig", "se", "st",
    "sp", "sv", "sr", "ss", "srt", "spr", "skoid", "sktid", "skt", "ske", "sks", "skv", "sdd",
    "q-sign-algorithm", "q-ak", "q-sign-time", "q-key-time", "q-header-list",
    "q-url-param-list", "q-signature",
])
def test_signature_params(name: str) -> None:
    assert is_signature_param(name)


@pytest.mark.parametrize("name", [
    "versionId", "response-content-type", "partNumber", "x-id", "digest", "ns", "a", "s",
    "signatures", "expiresAt", "sigma", "x-amz", "q-other", "generation", "alt",
])
def test_not_signature_params(name: str) -> None:
    assert not is_signature_param(name)


def test_azure_sas_per_client_params_are_signature() -> None:
    # A SAS minted per client (restricted to its IP or on behalf of its user) differs in these;
    # the same blob must still be one task, or peers never share it.
    a = BASE + "?sv=2022-11-02&sr=b&sp=r&se=2024-01-01T00:00:00Z&sip=10.0.0.1&sig=one"
    b = BASE + "?sv=2022-11-02&sr=b&sp=r&se=2024-01-01T00:00:00Z&sip=10.0.0.2&sig=two"
    assert task_id_for_url(a) == task_id_for_url(b)
    c = BASE + "?sv=2022-11-02&sr=b&sp=r&skoid=o&saoid=u1&sig=one"
    d = BASE + "?sv=2022-11-02&sr=b&sp=r&skoid=o&saoid=u2&sig=two"
    assert task_id_for_url(c) == task_id_for_url(d)


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "part", "v"]), st.text(
    alphabet="xyz019-_.~ /+=&%", max_size=8)), max_size=4),
    st.lists(st.tuples(st.sampled_from(["X-Amz-Signature", "sig", "Expires", "q-ak",
                                        "X-Goog-Date", "Signature"]),
                       st.text(alphabet="xyz019+/=", max_size=8)), max_size=4))
def test_signature_params_never_change_the_task_id(plain: list[tuple[str, str]],
                                                   sigs: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    without = BASE + ("?" + urlencode(plain) if plain else "")
    mixed = BASE + "?" + urlencode(sigs + plain) if (sigs or plain) else BASE
    assert task_id_for_url(mixed) == task_id_for_url(without)


# --- chunk ids --------------------------------------------------------------------------------

THRESHOLD = ids._THREADED_HASH_MIN


@pytest.mark.parametrize("size", [0, 1, 1024, (1 << 20), THRESHOLD - 1, THRESHOLD,
                                  THRESHOLD + 1, 2 * THRESHOLD + 12345])
def test_chunk_id_is_blake3_of_the_bytes(size: int) -> None:
    data = bytes((i * 7 + size) % 256 for i in range(min(size, 4096))) * (size // 4096 + 1)
    data = data[:size]
    expected = "blake3:" + blake3.blake3(data).hexdigest()
    assert chunk_id(data) == expected
    assert chunk_id(memoryview(data)) == expected
    assert chunk_id(bytearray(data)) == expected
    assert parse_chunk_id(chunk_id(data)) == expected


def test_chunk_id_known_vector() -> None:
    # BLAKE3 of the empty input (from the BLAKE3 test vectors)
    assert chunk_id(b"") == (
        "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")


def test_chunk_id_differs_for_one_flipped_byte_above_threshold() -> None:
    data = bytearray(THRESHOLD + 1)
    before = chunk_id(bytes(data))
    data[-1] = 1
    assert chunk_id(bytes(data)) != before
