"""Registry authentication for the tests: htpasswd files (Basic) and a small Docker token server
(Bearer) that distribution 2.8's `auth: token` accepts.

The token server takes Basic credentials (or none: anonymous), grants the intersection of the
requested scope and the user's grants, and answers a JWT signed RS256 whose `x5c` header carries
the self-signed certificate the registry trusts (its `rootcertbundle`).

For registries that keep blobs in object storage: `SignedStorage`, a store that serves only URLs
it signed (and answers HEAD to them, as CDNs and SAS URLs do), and `RedirectingTokenRegistry`,
a registry front that checks the token server's tokens and redirects authorised blob reads
there.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

import bcrypt
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from common.ranges import InvalidRange, UnsatisfiableRange, parse_range
from tests.cluster import free_port, self_signed_cert, serve

SERVICE = "naiad-test-registry"
ISSUER = "naiad-test-token-issuer"


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    path.write_text("".join(
        f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for user, pw in users.items()))
    return path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def htpasswd_yaml(path: Path) -> str:
    return f"auth:\n  htpasswd:\n    realm: basic-realm\n    path: {path}\n"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenServer:
    """`grants` maps a user (None: anonymous) to {repository glob: actions}."""

    def __init__(self, workdir: Path, users: dict[str, str],
                 grants: dict[str | None, dict[str, list[str]]]) -> None:
        self.users = users
        self.grants = grants
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.cert_path, key_path = self_signed_cert(workdir)
        self.key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.requests = 0
        self._runner: web.AppRunner | None = None

    def registry_yaml(self) -> str:
        return (f"auth:\n  token:\n    realm: {self.url}/token\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {self.cert_path}\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _user(self, request: web.Request) -> str | bool | None:
        """The authenticated user, None for anonymous, False for bad credentials."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else False

    def allowed(self, user: str | None, repo: str, wanted: list[str]) -> list[str]:
        granted: set[str] = set()
        for pattern, actions in self.grants.get(user, {}).items():
            if fnmatch.fnmatchcase(repo, pattern):
                granted |= set(actions)
        return [a for a in wanted if a in granted]

    def issue(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                access.append({"type": "repository", "name": name,
                               "actions": self.allowed(user, name, actions.split(","))})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}." \
                        f"{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        assert isinstance(self.key, rsa.RSAPrivateKey)
        return f"{signing_input}.{_b64(signature)}"

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this server issued and that is still valid, else None."""
        try:
            header, claims, signature = token.split(".")
            assert isinstance(self.key, rsa.RSAPrivateKey)
            self.key.public_key().verify(_unb64(signature), f"{header}.{claims}".encode(),
                                         padding.PKCS1v15(), hashes.SHA256())
            parsed = json.loads(_unb64(claims))
        except (ValueError, InvalidSignature, binascii.Error, UnicodeError):
            return None
        now = time.time()
        if parsed.get("aud") != SERVICE or not parsed.get("nbf", 0) <= now < parsed.get("exp", 0):
            return None
        return parsed

    def permits(self, authorization: str | None, repo: str, action: str) -> bool:
        """Whether a `Bearer <token>` header grants `action` on `repo`."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        claims = self.verify(authorization[len("Bearer "):])
        return claims is not None and any(
            a.get("type") == "repository" and a.get("name") == repo
            and action in a.get("actions", ()) for a in claims.get("access", ()))

    def challenge(self, repo: str) -> str:
        return f'Bearer realm="{self.url}/token",service="{SERVICE}",' \
               f'scope="repository:{repo}:pull"'

    async def _token(self, request: web.Request) -> web.Response:
        self.requests += 1
        user = self._user(request)
        if user is False:
            return web.json_response({"error": "bad credentials"}, status=401)
        params = dict(request.query)
        if request.method == "POST":
            params.update(await request.post())
        if params.get("service") != SERVICE:
            return web.json_response({"error": "unknown service"}, status=400)
        scopes = [s for s in str(params.get("scope", "")).split(" ") if s]
        token = self.issue(user if isinstance(user, str) else None, scopes)
        return web.json_response({"token": token, "access_token": token, "expires_in": 300,
                                  "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")})


class SignedStorage:
    """Object storage on loopback serving an object only through a URL it signed: `sig` is an
    HMAC of the object's name and the expiry `se` (like an Azure SAS or a CDN token). HEAD
    answers 200 with the length, GET serves ranges; what was sent and refused is counted."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self._key = secrets.token_bytes(32)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.heads = 0
        self.gets = 0
        self.refused = 0
        self.sent = 0  # body bytes of objects sent
        self._runner: web.AppRunner | None = None

    def _signature(self, name: str, expires: str) -> str:
        return hmac.new(self._key, f"{name}\n{expires}".encode(), "sha256").hexdigest()

    def sign(self, name: str, ttl: int = 300) -> str:
        expires = str(int(time.time()) + ttl)
        return f"{self.url}/objects/{name}?se={expires}&sig={self._signature(name, expires)}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/objects/{name:.+}", self._object)  # HEAD too
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _object(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        expires, sig = request.query.get("se", ""), request.query.get("sig", "")
        good = self._signature(name, expires)
        if name not in self.objects or not expires.isdigit() or int(expires) < time.time() \
                or not hmac.compare_digest(sig.encode(errors="surrogateescape"), good.encode()):
            self.refused += 1
            return web.Response(status=403, text="AuthenticationFailed")
        data = self.objects[name]
        try:
            rng = parse_range(request.headers.get("Range"), len(data))
        except (InvalidRange, UnsatisfiableRange):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {"Accept-Ranges": "bytes"}
        body, status = data, 200
        if rng is not None:
            body, status = data[rng.start:rng.end + 1], 206
            headers["Content-Range"] = rng.content_range(len(data))
        if request.method == "HEAD":
            self.heads += 1
            headers["Content-Length"] = str(len(body))
            return web.Response(status=status, headers=headers)
        self.gets += 1
        self.sent += len(body)
        return web.Response(status=status, body=body, headers=headers)


class RedirectingTokenRegistry:
    """A registry front checking `tokens`' Bearer tokens: an authorised blob HEAD or GET is
    redirected to a freshly signed `storage` URL (objects named by digest), as a registry on
    S3 or behind a CDN does; a request without a token granting pull answers the 401 challenge.
    `repos` maps a repository to the digests it holds."""

    def __init__(self, tokens: TokenServer, storage: SignedStorage,
                 repos: dict[str, set[str]]) -> None:
        self.tokens = tokens
        self.storage = storage
        self.repos = repos
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.redirects = 0
        self.refused = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v2/", self._base)
        app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", self._blob)  # HEAD too
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _unauthorized(self, repo: str) -> web.Response:
        self.refused += 1
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            status=401, headers={"WWW-Authenticate": self.tokens.challenge(repo)})

    async def _base(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or self.tokens.verify(header[7:]) is None:
            return self._unauthorized("")
        return web.json_response({})

    async def _blob(self, request: web.Request) -> web.Response:
        name, digest = request.match_info["name"], request.match_info["digest"]
        if not self.tokens.permits(request.headers.get("Authorization"), name, "pull"):
            return self._unauthorized(name)
        if digest not in self.repos.get(name, set()):
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        self.redirects += 1
        raise web.HTTPTemporaryRedirect(self.storage.sign(digest))
