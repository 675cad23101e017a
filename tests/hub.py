"""A small Hugging Face-compatible hub and its CDN, as real servers on loopback, for what the
`huggingface_hub` client uses:

- `GET /api/models/{repo}/revision/{rev}`: the commit (`sha`) and the files (`siblings`);
- `GET /api/models/{repo}/tree/{rev}`: the files with their git blob ids and LFS sha256s;
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag`; an LFS file also
  `X-Linked-Etag` (its sha256) and `X-Linked-Size`, and a 302 to a signed URL on the CDN; a
  small file kept in git answered directly;
- a private repository answers 401 without its Bearer token (as the real hub does, with
  `X-Error-Code: RepoNotFound`);
- like today's hub, LFS files are also offered by Xet (`X-Xet-Hash`, the `xet-auth` link, and
  `xetHash` in the tree), which this hub does not serve: a client that takes that offer fails.

The CDN serves a file only at a URL the hub signed (and not expired), with Range, and counts the
body bytes it sent: what the hub's egress cost, measured outside the peers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from aiohttp import web

from tests.cluster import free_port, serve

LFS_THRESHOLD = 10 << 20 >> 4  # files from 640 KiB up are LFS files (the real hub: 10 MB)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def xet_hash(data: bytes) -> str:
    return hashlib.sha256(b"xet" + data).hexdigest()  # well-formed; no Xet server behind it


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # private: this Bearer token only
    commit: str = field(default_factory=lambda: hashlib.sha1(str(time.time_ns()).encode(),
                                                             usedforsecurity=False).hexdigest())

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) >= LFS_THRESHOLD


class Cdn:
    """Files by sha256 at signed, expiring URLs; counts the body bytes it served."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = b"cdn signing key"
        self.blobs: dict[str, bytes] = {}
        self.bytes_served = 0
        self.refused = 0
        self._runner: web.AppRunner | None = None

    def sign(self, sha: str, ttl: float = 3600) -> str:
        expires = str(int(time.time() + ttl))
        mac = hmac.new(self.key, f"{sha}:{expires}".encode(), "sha256").hexdigest()
        return f"{self.url}/lfs/{sha}?Expires={expires}&X-Amz-Signature={mac}"

    async def _get(self, request: web.Request) -> web.StreamResponse:
        sha = request.match_info["sha"]
        expires = request.query.get("Expires", "0")
        mac = hmac.new(self.key, f"{sha}:{expires}".encode(), "sha256").hexdigest()
        if not hmac.compare_digest(mac, request.query.get("X-Amz-Signature", "")) \
                or int(expires) < time.time() or "Authorization" in request.headers:
            self.refused += 1  # a signed URL never needs (nor gets) the hub token
            return web.Response(status=403, text="bad signature")
        data = self.blobs.get(sha)
        if data is None:
            return web.Response(status=404)
        status, start, end = 200, 0, len(data)
        if "Range" in request.headers:
            rng = request.http_range
            start = rng.start or 0
            end = min(rng.stop if rng.stop is not None else len(data), len(data))
            status = 206
        body = data[start:end]
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if request.method == "HEAD":
            return web.Response(status=status, headers={**headers,
                                                        "Content-Length": str(len(body))})
        self.bytes_served += len(body)
        return web.Response(status=status, body=body, headers=headers,
                            content_type="application/octet-stream")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/lfs/{sha}", self._get)  # HEAD too
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Hub:
    def __init__(self, cdn: Cdn) -> None:
        self.cdn = cdn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self._runner: web.AppRunner | None = None

    def add(self, name: str, files: dict[str, bytes], token: str | None = None) -> Repo:
        repo = self.repos[name] = Repo(files, token)
        for path in files:
            if repo.is_lfs(path):
                data = files[path]
                self.cdn.blobs[hashlib.sha256(data).hexdigest()] = data
        return repo

    def _repo(self, request: web.Request, name: str, revision: str) -> Repo:
        repo = self.repos.get(name)
        if repo is not None and repo.token is not None \
                and request.headers.get("Authorization") != f"Bearer {repo.token}":
            repo = None  # the real hub: a private repo is "not found" to others, with 401
        if repo is None:
            raise web.HTTPUnauthorized(headers={"X-Error-Code": "RepoNotFound"},
                                       text=json.dumps({"error": "Repository not found"}),
                                       content_type="application/json")
        if revision not in ("main", repo.commit):
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"},
                                   text=json.dumps({"error": "Invalid rev id"}),
                                   content_type="application/json")
        return repo

    @web.middleware
    async def _log(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        self.requests.append((request.method, request.path, request.headers.get(
            "Authorization")))
        return await handler(request)

    async def _revision(self, request: web.Request) -> web.Response:
        name = request.match_info["repo"]
        repo = self._repo(request, name, request.match_info["rev"])
        return web.json_response({
            "id": name, "modelId": name, "sha": repo.commit, "private": repo.token is not None,
            "siblings": [{"rfilename": path} for path in sorted(repo.files)]})

    async def _tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request, request.match_info["repo"], request.match_info["rev"])
        entries = []
        for path, data in sorted(repo.files.items()):
            entry: dict[str, object] = {"type": "file", "path": path, "size": len(data),
                                        "oid": git_blob_id(data)}
            if repo.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
                entry["xetHash"] = xet_hash(data)
            entries.append(entry)
        return web.json_response(entries)

    async def _resolve(self, request: web.Request) -> web.Response:
        repo = self._repo(request, request.match_info["repo"], request.match_info["rev"])
        path = request.match_info["path"]
        headers = {"X-Repo-Commit": repo.commit}
        if path not in repo.files:
            return web.Response(status=404, headers={**headers, "X-Error-Code": "EntryNotFound"})
        data = repo.files[path]
        if repo.is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            refresh = f"{self.url}/api/models/{request.match_info['repo']}/xet-read-token/" \
                      f"{repo.commit}"
            return web.Response(status=302, headers={
                **headers, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                "ETag": f'"{sha}"', "Location": self.cdn.sign(sha),
                "X-Xet-Hash": xet_hash(data), "X-Xet-Refresh-Route": refresh,
                "Link": f'<{refresh}>; rel="xet-auth"'})
        headers["ETag"] = f'"{git_blob_id(data)}"'
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        return web.Response(body=data, headers=headers, content_type="application/octet-stream")

    async def start(self) -> None:
        app = web.Application(middlewares=[self._log])
        r = app.router
        for prefix in ("", "/datasets"):
            kind = "datasets" if prefix else "models"
            r.add_get(f"/api/{kind}/{{repo:[^/]+/[^/]+}}/revision/{{rev}}", self._revision)
            r.add_get(f"/api/{kind}/{{repo:[^/]+/[^/]+}}/tree/{{rev}}", self._tree)
            r.add_get(f"{prefix}/{{repo:[^/]+/[^/]+}}/resolve/{{rev}}/{{path:.+}}",
                      self._resolve)  # HEAD too
        self._runner = await serve(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def resolves(self, path_contains: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if "/resolve/" in r[1] and path_contains in r[1]]


def resolve_url(base: str, repo: str, path: str, revision: str = "main") -> str:
    return f"{base}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"
