"""Cluster secret: peers and schedulers prove membership with an HMAC over each request.

The header is `X-Naiad-Auth: <unix-seconds>.<hex hmac-sha256(secret, message)>` where the
message is `ts \\n METHOD \\n path \\n sha256(body)`. The secret itself never travels; a captured
header is good only for the same request (path and body) within the skew window, so it cannot
carry another announcement.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from common.web import Handler, error

HEADER = "X-Naiad-Auth"
MAX_SKEW_SECONDS = 300


def load_secret(secret: str | None, secret_file: str | None) -> bytes | None:
    if secret_file:
        text = Path(secret_file).expanduser().read_text().strip()
        if not text:
            raise ValueError(f"cluster secret file {secret_file} is empty")
        return text.encode()
    return secret.encode() if secret else None


def sign(secret: bytes, method: str, path: str, body: bytes = b"",
         now: float | None = None) -> str:
    ts = str(int(now if now is not None else time.time()))
    message = f"{ts}\n{method.upper()}\n{path}\n{hashlib.sha256(body).hexdigest()}"
    return f"{ts}.{hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()}"


def verify(secret: bytes, header: str | None, method: str, path: str, body: bytes = b"",
           now: float | None = None) -> bool:
    if not header:
        return False
    ts, _, mac = header.partition(".")
    if not ts.isdigit() or len(ts) > 12:
        return False
    now = now if now is not None else time.time()
    if abs(now - int(ts)) > MAX_SKEW_SECONDS:
        return False
    expected = sign(secret, method, path, body, int(ts)).partition(".")[2]
    return hmac.compare_digest(expected, mac)


def require_secret(secret: bytes | None,
                   guarded: Callable[[web.Request], bool]) -> object:
    """Middleware refusing the requests `guarded` selects unless they carry a valid signature."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if secret is not None and guarded(request) and not verify(
                secret, request.headers.get(HEADER), request.method, request.path,
                await request.read()):
            return error(401, "cluster secret required: missing or invalid X-Naiad-Auth")
        return await handler(request)

    return middleware
