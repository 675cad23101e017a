"""The origin: Debian's `docker-registry` (distribution 2.8) in the origin namespace, and the
random blobs pushed into it (over the namespace's loopback, so the push never shows in the
origin interface's counters)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.swarm.topology import Lab

PORT = 5000
# distribution's access log (combined format): client - - [time] "GET path HTTP/1.1" status bytes
_ACCESS = re.compile(r'^(?P<client>\S+) \S+ \S+ \[[^]]*\] "GET /v2/\S+/blobs/\S+ [^"]*" '
                     r'(?P<status>20[06]) (?P<bytes>\d+)', re.MULTILINE)
MiB = 1 << 20


@dataclass(frozen=True)
class Blob:
    path: Path  # a local copy (BitTorrent's seeder serves it)
    size: int
    digest: str  # sha256:<hex>
    repo: str

    @property
    def url_path(self) -> str:
        return f"/v2/{self.repo}/blobs/{self.digest}"


def make_blob(path: Path, size: int) -> tuple[str, int]:
    """Write `size` random bytes to `path`; return their sha256 digest and the size."""
    h = hashlib.sha256()
    left = size
    with open(path, "wb") as f:
        while left:
            part = os.urandom(min(left, 16 * MiB))
            h.update(part)
            f.write(part)
            left -= len(part)
    return "sha256:" + h.hexdigest(), size


class Registry:
    def __init__(self, lab: Lab, workdir: Path, log: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.log = log  # with the access log: one line per request, with the bytes sent
        self.url = f"http://{lab.origin.ip}:{PORT}"
        self.local = f"http://127.0.0.1:{PORT}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        config = self._write_config()
        self.proc = await self.lab.spawn(self.lab.origin, [binary, "serve", str(config)],
                                         self.log)
        await self.lab.wait_http(self.lab.origin, f"{self.local}/v2/", proc=self.proc)

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {self.workdir / 'data'}
  delete:
    enabled: true
http:
  addr: 0.0.0.0:{PORT}
""")
        return config

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def gets_since(self, offset: int) -> list[tuple[str, int]]:
        """(client address, bytes sent) of every blob GET logged after `offset`."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        gets = []
        for m in _ACCESS.finditer(text):
            gets.append((m["client"], int(m["bytes"])))
        return gets

    async def stop(self) -> None:
        if self.proc is not None:
            await self.lab.stop(self.proc)

    async def push(self, path: Path, digest: str, size: int, repo: str) -> Blob:
        """Monolithic upload: POST an upload session, PUT the bytes with the digest."""
        location = (await self._curl("-X", "POST", "-D", "-", "-o", "/dev/null",
                                     f"{self.local}/v2/{repo}/blobs/uploads/"))
        loc = next(line.split(":", 1)[1].strip() for line in location.splitlines()
                   if line.lower().startswith("location:"))
        if loc.startswith("/"):
            loc = self.local + loc
        sep = "&" if "?" in loc else "?"
        await self._curl("-X", "PUT", "--data-binary", f"@{path}",
                         "-H", "Content-Type: application/octet-stream", "-o", "/dev/null",
                         f"{loc}{sep}digest={digest}")
        head = await self._curl("-I", f"{self.local}/v2/{repo}/blobs/{digest}")
        if f"content-length: {size}" not in head.lower():
            raise RuntimeError(f"registry does not hold {digest} after the push:\n{head}")
        return Blob(path, size, digest, repo)

    async def _curl(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.lab.origin.ns, "curl", "-sSf", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"curl {' '.join(args)}: {err.decode().strip()}")
        return out.decode(errors="replace")
