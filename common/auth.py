"""Cluster secret: peers and schedulers prove membership with an HMAC over each request.

The header is `X-Naiad-Auth: <unix-seconds>.<nonce>.<hex hmac-sha256(secret, message)>`: the
nonce is 16 random bytes in hex and the message is `ts \\n nonce \\n METHOD \\n path \\n
sha256(body)`. The secret itself never travels. A receiver takes a header only within the skew
window and only once (`NonceCache` remembers the nonces it took until their timestamp leaves the
window), so a captured header can neither carry another request nor repeat its own.

With no secret given, the daemons a user starts share a per-user secret generated on first use
(`user_secret_path`, mode 0600), so one host needs no flags and every internal call is signed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from common.web import Handler, error, unavailable

HEADER = "X-Naiad-Auth"
# A signature is good within this many seconds of the receiver's clock, and only once: its nonce
# is remembered until it leaves the window. Clocks of one cluster (NTP) agree to well under a
# second; a short window keeps the nonce cache small at a fleet's call rates.
MAX_SKEW_SECONDS = 60
NONCE_CAPACITY = 1 << 20  # ~88 bytes each (measured): at most ~90 MB; ~17,000 calls/s sustained
# The caller proved membership (or there is no secret).
MEMBER = web.RequestKey("naiad.member", bool)
_HEADER_SHAPE = re.compile(r"([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})")


class AuthError(Exception):
    """A request refused: 401 (unsigned, malformed, stale, badly signed, replayed) or 503 (the
    nonce cache is full: try again shortly)."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class SecretError(ValueError):
    """A cluster secret that cannot be loaded: one start-up line names the file and why."""


# -- signatures (pure) ---------------------------------------------------------------------------

def new_nonce() -> str:
    return secrets.token_hex(16)


@functools.lru_cache(maxsize=16)
def _keyed(secret: bytes) -> hmac.HMAC:
    """HMAC's state once the secret is keyed in: copied for each message rather than keyed
    again (half the work of a short message's MAC; a process holds one or two secrets)."""
    return hmac.new(secret, digestmod="sha256")


def _mac(secret: bytes, ts: str, nonce: str, method: str, path: str, body: bytes) -> str:
    h = _keyed(secret).copy()
    h.update(f"{ts}\n{nonce}\n{method.upper()}\n{path}\n"
             f"{hashlib.sha256(body).hexdigest()}".encode())
    return h.hexdigest()


def sign(secret: bytes, method: str, path: str, body: bytes = b"",
         now: float | None = None, nonce: str | None = None) -> str:
    ts = str(int(now if now is not None else time.time()))
    nonce = nonce or new_nonce()
    return f"{ts}.{nonce}.{_mac(secret, ts, nonce, method, path, body)}"


def check(secret: bytes, header: str | None, method: str, path: str, body: bytes = b"",
          now: float | None = None) -> tuple[int, str]:
    """The (timestamp, nonce) of a valid signature; AuthError with the reason otherwise. Any
    header at all (non-ASCII, garbage) is an answer, never an exception of another kind."""
    if not header:
        raise AuthError(f"cluster secret required: missing {HEADER}")
    m = _HEADER_SHAPE.fullmatch(header) if header.isascii() else None
    if m is None:
        raise AuthError(f"malformed {HEADER}: expected <unix-seconds>.<32 hex nonce>.<64 hex "
                        "hmac>")
    ts, nonce, mac = m.groups()
    now = now if now is not None else time.time()
    if abs(now - int(ts)) > MAX_SKEW_SECONDS:
        raise AuthError(f"{HEADER} timestamp is more than {MAX_SKEW_SECONDS} s from this "
                        "host's clock")
    if not hmac.compare_digest(_mac(secret, ts, nonce, method, path, body), mac):  # ASCII
        raise AuthError(f"invalid {HEADER}: wrong cluster secret, or not this request's "
                        "signature")
    return int(ts), nonce


def verify(secret: bytes, header: str | None, method: str, path: str, body: bytes = b"",
           now: float | None = None) -> bool:
    """Whether the signature is valid (replays are the receiver's `Verifier`'s business)."""
    try:
        check(secret, header, method, path, body, now)
    except AuthError:
        return False
    return True


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time as bytes: a header with any
    bytes in it (aiohttp hands undecodable ones over as surrogates) is a plain no."""
    given = (header or "").encode("utf-8", "backslashreplace")
    return hmac.compare_digest(given, f"Bearer {token}".encode("utf-8", "backslashreplace"))


class NonceCache:
    """The nonces accepted while their timestamp is inside the skew window, in buckets by
    second so expiry drops whole seconds. Bounded: when `capacity` live nonces are held a new
    one is refused (503) rather than a live one forgotten, which would reopen it to replay."""

    def __init__(self, capacity: int = NONCE_CAPACITY,
                 window: int = MAX_SKEW_SECONDS) -> None:
        self.capacity = capacity
        self.window = window
        self._by_second: dict[int, set[bytes]] = {}
        self._seconds: list[int] = []  # heap of the keys of _by_second
        self.size = 0

    def _expire(self, now: float) -> None:
        while self._seconds and self._seconds[0] + self.window < now:
            self.size -= len(self._by_second.pop(heapq.heappop(self._seconds)))

    def admit(self, nonce: str, ts: int, now: float) -> None:
        """Remember a nonce seen with a (valid, in-window) timestamp; AuthError if seen."""
        self._expire(now)
        key = bytes.fromhex(nonce)
        bucket = self._by_second.get(ts)
        if bucket is not None and key in bucket:
            raise AuthError(f"replayed {HEADER}: this signature was already used")
        if self.size >= self.capacity:
            raise AuthError(f"too many signed calls in {self.window} s to tell replays apart: "
                            "try again shortly", status=503)
        if bucket is None:
            bucket = self._by_second[ts] = set()
            heapq.heappush(self._seconds, ts)
        bucket.add(key)
        self.size += 1


class Verifier:
    """A server's side of the secret: valid signatures, each accepted once. The cache is this
    process's: scheduler replicas over one Redis each keep their own, so a header sent to one
    replica can be replayed once to another within the window."""

    def __init__(self, secret: bytes, nonces: NonceCache | None = None) -> None:
        self.secret = secret
        self.nonces = nonces or NonceCache()

    def check(self, header: str | None, method: str, path: str, body: bytes = b"",
              now: float | None = None) -> None:
        now = now if now is not None else time.time()
        ts, nonce = check(self.secret, header, method, path, body, now)
        self.nonces.admit(nonce, ts, now)


def refusal(e: AuthError) -> web.Response:
    return unavailable(e.reason) if e.status == 503 else error(e.status, e.reason)


def authenticate(verifier: Verifier | None,
                 required: Callable[[web.Request], bool]) -> object:
    """Middleware: a request carrying `X-Naiad-Auth` must carry a valid, fresh one; those
    `required` selects must carry one. `is_member(request)` tells handlers which callers proved
    membership — every caller, when there is no secret (`--insecure`)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = await admit(verifier, required, request)
        return refused if refused is not None else await handler(request)

    return middleware


async def admit(verifier: Verifier | None, required: Callable[[web.Request], bool],
                request: web.Request) -> web.Response | None:
    """`authenticate`'s step on its own, for a server that folds it into its one middleware:
    None to serve the request (`is_member` then answers), else the refusal to send."""
    if verifier is None:
        request[MEMBER] = True
        return None
    header = request.headers.get(HEADER)
    if header is None and not required(request):
        request[MEMBER] = False
        return None
    try:
        verifier.check(header, request.method, request.path, await request.read())
    except AuthError as e:
        return refusal(e)
    request[MEMBER] = True
    return None


def is_member(request: web.Request) -> bool:
    return bool(request.get(MEMBER, False))


# -- loading the secret --------------------------------------------------------------------------

def load_secret(secret: str | None, secret_file: str | None) -> bytes | None:
    """The secret given with --cluster-secret or --cluster-secret-file, if any."""
    if secret_file:
        path = Path(secret_file).expanduser()
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SecretError(f"cannot read cluster secret file {path}: {e}") from None
        if not text:
            raise SecretError(f"cluster secret file {path} is empty")
        return text.encode()
    return secret.encode() if secret else None


def user_secret_path(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/naiad/cluster-secret`, else `~/.config/naiad/cluster-secret`: the
    same for every daemon a user starts, whatever its --data-dir."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        if not os.path.isabs(home):
            raise SecretError("no home directory to keep the per-user cluster secret in: set "
                              "HOME or XDG_CONFIG_HOME, or give --cluster-secret-file")
        base = os.path.join(home, ".config")
    return Path(base) / "naiad" / "cluster-secret"


def user_secret(path: Path | None = None, create: bool = True) -> bytes | None:
    """The per-user secret, generated on first use (None if absent and not `create`). It must
    belong to this user and be readable by nobody else."""
    path = path or user_secret_path()
    try:
        return _read_private(path)
    except FileNotFoundError:
        if not create:
            return None
    try:
        _create_private(path)
        return _read_private(path)
    except OSError as e:
        raise SecretError(f"cannot create the per-user cluster secret {path}: {e}") from None


def _read_private(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SecretError(f"cannot read the per-user cluster secret {path}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"the per-user cluster secret {path} is not a regular file")
        if st.st_uid != os.getuid():
            raise SecretError(f"the per-user cluster secret {path} belongs to uid {st.st_uid}, "
                              "not to you")
        if st.st_mode & 0o077:
            raise SecretError(f"the per-user cluster secret {path} is open to group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it")
        text = f.read().strip()
    if not text:
        raise SecretError(f"the per-user cluster secret {path} is empty: delete it to have "
                          "a new one generated")
    return text


def _create_private(path: Path) -> None:
    """Write a new secret to a private temporary file, then link it into place: the link fails
    if another daemon got there first (its secret wins), and nobody ever reads a half-written
    file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another daemon's secret won
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
