"""Registry authentication for the tests: htpasswd files (Basic) and a small Docker token server
(Bearer) that distribution 2.8's `auth: token` accepts.

The token server takes Basic credentials (or none: anonymous), grants the intersection of the
requested scope and the user's grants, and answers a JWT signed RS256 whose `x5c` header carries
the self-signed certificate the registry trusts (its `rootcertbundle`).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import secrets
import time
from pathlib import Path

import bcrypt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.cluster import free_port, self_signed_cert

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
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

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
