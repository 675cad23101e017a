"""Heartbeat datagrams (UDP), without I/O: bounded in size, validated like any wire model, and
signed with the cluster secret when there is one.

A datagram is the JSON `{"v": 2, "id": peer, "ts": unix seconds, "n": nonce, "hb": Heartbeat}`,
then a newline, then the hex HMAC-SHA256 of that JSON under the secret (empty without a secret).
The nonce (16 random bytes in hex, new for every datagram) lets the listener refuse a replay
(`auth.NonceCache`): a captured datagram keeps no dead peer alive. The scheduler answers `ok`,
or `unknown` when it does not know the peer (register again).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import NamedTuple

from pydantic import ValidationError

from common import auth
from common.models import Heartbeat, valid_peer_id

MAX_DATAGRAM = 1400  # fits one Ethernet frame
MAX_SKEW_SECONDS = auth.MAX_SKEW_SECONDS
VERSION = 2
ACK_OK = b"ok"
ACK_UNKNOWN = b"unknown"
_NONCE = re.compile(r"[0-9a-f]{32}")


class DatagramError(ValueError):
    """A datagram to drop: oversized, malformed, unsigned, badly signed or stale."""


class Beat(NamedTuple):
    peer_id: str
    heartbeat: Heartbeat
    ts: int
    nonce: str


def _mac(secret: bytes | None, payload: bytes) -> bytes:
    if secret is None:
        return b""
    return hmac.new(secret, payload, hashlib.sha256).hexdigest().encode()


def encode(peer_id: str, hb: Heartbeat, secret: bytes | None, now: float | None = None,
           nonce: str | None = None) -> bytes:
    payload = json.dumps({"v": VERSION, "id": peer_id,
                          "ts": int(now if now is not None else time.time()),
                          "n": nonce or auth.new_nonce(), "hb": hb.model_dump(mode="json")},
                         separators=(",", ":")).encode()
    data = payload + b"\n" + _mac(secret, payload)
    if len(data) > MAX_DATAGRAM:
        raise DatagramError(f"heartbeat of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def decode(data: bytes, secret: bytes | None, now: float | None = None) -> Beat:
    if len(data) > MAX_DATAGRAM:
        raise DatagramError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    payload, sep, mac = data.rpartition(b"\n")
    if not sep:
        raise DatagramError("no signature line")
    if not hmac.compare_digest(_mac(secret, payload), mac):
        raise DatagramError("bad signature")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatagramError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise DatagramError("unknown datagram version")
    peer_id, ts, nonce = doc.get("id"), doc.get("ts"), doc.get("n")
    if not isinstance(peer_id, str) or not valid_peer_id(peer_id):
        raise DatagramError("invalid peer id")
    if not isinstance(ts, int) or isinstance(ts, bool):
        raise DatagramError("invalid timestamp")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise DatagramError("invalid nonce")
    if abs((now if now is not None else time.time()) - ts) > MAX_SKEW_SECONDS:
        raise DatagramError("stale or future timestamp")
    try:
        return Beat(peer_id, Heartbeat.model_validate(doc.get("hb")), ts, nonce)
    except ValidationError as e:
        raise DatagramError(f"invalid heartbeat: {e.errors()[0]['msg']}") from None
