"""Test harness: real processes (docker-registry, naiad scheduler and peers) on loopback, ports
that do not collide, readiness by polling health endpoints, and a byte-counting front for the
registry so tests count what the origin really sent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from common import auth
from peer.sched_framed import FramedTransport
from peer.sched_transport import HttpTransport
from tests.zygote import ForkedProcess, forkable, zygote

# Ports below Linux's ephemeral range (32768+), so outgoing connections never take them.
_ports = itertools.count(random.Random(os.getpid()).randrange(20000, 28000, 100))


def free_port() -> int:
    for port in _ports:
        if port >= 32000:
            raise RuntimeError("out of test ports")
        with socket.socket() as s, socket.socket(type=socket.SOCK_DGRAM) as u:
            try:  # free for TCP and UDP alike: a scheduler takes both
                s.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable")


async def serve(app: aiohttp.web.Application, port: int,
                host: str = "127.0.0.1") -> aiohttp.web.AppRunner:
    """Run a small real server (a test's fake) on host:port; `await runner.cleanup()` ends it."""
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, host, port).start()
    return runner


async def wait_http(url: str, seconds: float = 20.0, proc: Proc | None = None,
                    ssl: object = None, ok: tuple[int, ...] = (200,)) -> None:
    """Until `url` answers 200 (a readiness check, not a sleep: returns on the first 200)."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:
        while True:
            if proc is not None and proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                                   f"{proc.logs()}")
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2),
                                 ssl=ssl if ssl is not None else True) as r:
                    if r.status in ok:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {seconds} s"
                                   + (f":\n{proc.logs()}" if proc else ""))
            await asyncio.sleep(0.05)


async def until(predicate: Callable[[], Awaitable[bool]], seconds: float = 20.0,
                what: str = "condition") -> None:
    """Poll an async predicate until it holds."""
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {seconds} s")
        await asyncio.sleep(0.05)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen | ForkedProcess
    log_path: Path

    def logs(self) -> str:
        try:
            return self.log_path.read_text()[-20000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Proc:
    log_path = workdir / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    if forkable(argv, full_env):
        return Proc(name, zygote().fork(argv[3:], workdir, full_env, log_path), log_path)
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
    popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                             env=full_env, start_new_session=True)
    log.close()
    return Proc(name, popen, log_path)


def naiad(*args: str) -> list[str]:
    return [sys.executable, "-m", "naiad", *args]


class Registry:
    """Debian's docker-registry (distribution 2.8) on a loopback port."""

    def __init__(self, workdir: Path, auth_yaml: str = "", tls: tuple[Path, Path] | None = None,
                 port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        tls_yaml = f"\n  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}" if tls else ""
        config = workdir / "config.yml"
        config.write_text(f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {workdir / 'data'}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}{tls_yaml}
{auth_yaml}""")
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.proc = spawn("registry", [binary, "serve", str(config)], workdir)

    async def ready(self, ssl: object = None) -> None:
        await wait_http(f"{self.url}/v2/", proc=self.proc, ssl=ssl, ok=(200, 401))

    def stop(self) -> None:
        self.proc.stop()


async def push_blob(registry_url: str, repo: str, data: bytes,
                    headers: dict[str, str] | None = None, ssl: object = True) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession(headers=headers or {},
                                     connector=aiohttp.TCPConnector(ssl=ssl)) as s:
        async with s.post(f"{registry_url}/v2/{repo}/blobs/uploads/") as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        if location.startswith("/"):
            location = registry_url + location
        sep = "&" if "?" in location else "?"
        async with s.put(f"{location}{sep}digest={digest}", data=data,
                         headers={"Content-Type": "application/octet-stream"}) as r:
            assert r.status == 201, await r.text()
    return digest


class CountingProxy:
    """A TCP relay in front of a server that counts the bytes the server sent back: the
    registry's own egress, measured outside the peers."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.bytes_down = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.port = free_port()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       count: bool) -> None:
            try:
                while data := await src.read(1 << 18):
                    if count:
                        self.bytes_down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        except asyncio.CancelledError:
            writer.close()
            up_writer.close()
        finally:
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await self._server.wait_closed()


@dataclass
class Node:
    name: str
    proc: Proc
    url: str
    extra: dict = field(default_factory=dict)


class Cluster:
    """Schedulers and peers as real `naiad` processes."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[Node] = []
        self._udp_ports: dict[int, int] = {}
        self.ssl: object = None  # a client SSL context trusting the certificates of `tls=`

    async def scheduler(self, *args: str, name: str = "scheduler", port: int | None = None,
                        tls: tuple[Path, Path] | None = None) -> Node:
        port = port or free_port()
        # A restarted scheduler keeps its UDP port too: peers remember it.
        udp = self._udp_ports.setdefault(port, free_port())
        if "--udp" not in args:
            args = ("--udp", f"127.0.0.1:{udp}", *args)
        args = (*args, *_tls_args(tls))
        proc = spawn(name, naiad("scheduler", "--listen", f"127.0.0.1:{port}",
                                 "--heartbeat-interval", "0.5", *args), self.workdir)
        node = Node(name, proc, f"{_scheme(tls)}://127.0.0.1:{port}", {"port": port, "udp": udp})
        self.nodes.append(node)
        await wait_http(f"{node.url}/healthy", proc=proc, ssl=self.ssl if tls else None)
        return node

    def peer_args(self, name: str, scheduler: str, registry: str, *args: str) -> tuple:
        listen, upload = free_port(), free_port()
        data = self.workdir / name
        argv = naiad("peer", "--id", name, "--scheduler", scheduler,
                     "--listen", f"127.0.0.1:{listen}", "--upload", f"127.0.0.1:{upload}",
                     "--data-dir", str(data), "--registry", registry, *args)
        return argv, listen, upload

    async def peer(self, name: str, scheduler: str, registry: str, *args: str,
                   wait_registered: bool = True, env: dict[str, str] | None = None,
                   tls: tuple[Path, Path] | None = None) -> Node:
        argv, listen, upload = self.peer_args(name, scheduler, registry, *args,
                                              *_tls_args(tls))
        proc = spawn(name, argv, self.workdir, env)
        node = Node(name, proc, f"{_scheme(tls)}://127.0.0.1:{listen}",
                    {"upload": upload, "argv": argv, "scheduler": scheduler})
        self.nodes.append(node)
        await wait_http(f"{node.url}/healthy", proc=proc, ssl=self.ssl if tls else None)
        if wait_registered:
            await wait_registered_peer(scheduler, name, ssl=self.ssl)
        return node

    async def restart(self, node: Node) -> None:
        node.proc.stop()
        node.proc = spawn(node.name, node.extra["argv"], self.workdir)
        await wait_http(f"{node.url}/healthy", proc=node.proc)

    def stop(self) -> None:
        for node in self.nodes:
            node.proc.stop(signal.SIGINT)

    def logs(self) -> str:
        return "\n".join(f"===== {n.name} =====\n{n.proc.logs()}" for n in self.nodes)


def _tls_args(tls: tuple[Path, Path] | None) -> tuple[str, ...]:
    return ("--tls-cert", str(tls[0]), "--tls-key", str(tls[1])) if tls else ()


def _scheme(tls: tuple[Path, Path] | None) -> str:
    return "https" if tls else "http"


async def wait_registered_peer(scheduler: str, peer_id: str, seconds: float = 20.0,
                               ssl: object = None) -> None:
    async def registered() -> bool:
        async with aiohttp.ClientSession() as s, \
                s.get(f"{scheduler}/api/v1/peers/{peer_id}",
                      ssl=ssl if ssl is not None and scheduler.startswith("https") else True
                      ) as r:
            return r.status == 200
    await until(registered, seconds, f"peer {peer_id} registered at {scheduler}")


def member_secret() -> bytes:
    """The per-user cluster secret this test's daemons share: conftest points XDG_CONFIG_HOME
    at a directory of the test's own, and the first daemon started generated it there."""
    secret = auth.user_secret(create=False)
    assert secret is not None, "no daemon has generated the per-user secret yet"
    return secret


def signed(method: str, url: str, body: bytes = b"", secret: bytes | None = None
           ) -> dict[str, str]:
    """The X-Naiad-Auth header a member would send with this request (good once)."""
    from yarl import URL

    return {auth.HEADER: auth.sign(secret or member_secret(), method, URL(url).path, body)}


@contextlib.asynccontextmanager
async def framed_client(secret: bytes, **kwargs: object
                        ) -> AsyncIterator[tuple[aiohttp.ClientSession, FramedTransport]]:
    """A session and a framed scheduler transport over it (as a peer calls), closed after."""
    async with aiohttp.ClientSession() as http:
        t = FramedTransport(HttpTransport(http, secret), secret, **kwargs)  # type: ignore[arg-type]
        try:
            yield http, t
        finally:
            await t.close()


def member_session(secret: bytes | None = None, **kwargs: object) -> aiohttp.ClientSession:
    """A client session that signs every request like a member of the cluster (the per-user
    secret unless given): what the scheduler's full views and the upload ports need."""

    async def sign(request: aiohttp.ClientRequest,
                   handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        body = request.body
        raw = await body.as_bytes() if not isinstance(body, bytes) else body
        request.headers.update(signed(request.method, str(request.url), raw, secret))
        return await handler(request)

    return aiohttp.ClientSession(middlewares=(sign,), **kwargs)


async def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample from a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        text = await r.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in (labels or {}).items()):
                return sample.value
    raise KeyError(name)


async def pull_digest(url: str) -> str:
    """GET a blob, streamed; the sha256 digest of what arrived."""
    h = hashlib.sha256()
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        async for chunk in r.content.iter_chunked(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


async def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.read()


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (openssl), for an https registry."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                   capture_output=True)
    return cert, key
