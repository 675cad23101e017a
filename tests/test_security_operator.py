"""Finding 5 of the security review, as attacks on live schedulers: the operator API open to
strangers, and preheat as a way to make the scheduler reach (and report on) any host.

- a scheduler listening beyond loopback will not start without --token (or --insecure);
- preheat reaches only the scheduler's own --allow-registry list: anything else is refused with
  a 4xx before any connection, and a registry's redirect to a host off the list is not followed;
- /jobs says nothing about hosts off the list (an open port and a closed one look the same);
- the job book is bounded: 32 under way (then 429), the 100 most recent finished ones kept.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import aiohttp
import pytest
from aiohttp import web

from common.web import RequestError
from scheduler import preheat
from tests.cluster import (
    Cluster,
    CountingProxy,
    Node,
    Registry,
    free_port,
    naiad,
    serve,
    spawn,
    until,
    wait_http,
)
from tests.images import push_image

TOKEN = "operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _run(*args: str, seconds: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds)
    return proc.returncode, out.decode()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


async def test_a_scheduler_beyond_loopback_needs_a_token(cluster: Cluster) -> None:
    port = free_port()
    rc, out = await _run("scheduler", "--listen", f"0.0.0.0:{port}", "--udp", "off",
                         "--cluster-secret", "s3cret")
    assert rc == 2, out
    assert out.count("\n") == 1 and out.startswith("naiad scheduler: "), out
    assert "--token" in out and "Traceback" not in out, out
    assert _port_free(port), "the refused scheduler was listening"
    # With a token it starts, and its operator calls need that token.
    proc = spawn("exposed", naiad("scheduler", "--listen", f"0.0.0.0:{port}", "--udp", "off",
                                  "--cluster-secret", "s3cret", "--token", TOKEN),
                 cluster.workdir)
    cluster.nodes.append(Node("exposed", proc, f"http://127.0.0.1:{port}"))
    await wait_http(f"http://127.0.0.1:{port}/healthy", proc=proc)
    async with aiohttp.ClientSession() as s:
        async with s.delete(f"http://127.0.0.1:{port}/api/v1/peers/anyone") as r:
            assert r.status == 401
        async with s.post(f"http://127.0.0.1:{port}/api/v1/preheat",
                          json={"url": "http://example.com/x"}) as r:
            assert r.status == 401


class Listener:
    """A TCP port that counts who connects to it (and answers HTTP 200 with a secret), or a
    closed port (`open=False`)."""

    def __init__(self, host: str = "127.0.0.1", open: bool = True) -> None:
        self.host = host
        self.port = free_port()
        self.open = open
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        if self.open:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\n"
                     b"internal data!")
        await writer.drain()
        writer.close()

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Redirector:
    """An allow-listed "registry" whose every answer is a redirect to `to`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.to = ""
        self.hits = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Redirector:
        async def redirect(_: web.Request) -> web.Response:
            self.hits += 1
            raise web.HTTPTemporaryRedirect(self.to)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        self._runner = await serve(app, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _post(sched: Node, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(f"{sched.url}/api/v1/preheat", json=body,
                                                    headers=AUTH) as r:
        return r.status, await r.json()


async def _jobs(sched: Node) -> list[dict]:
    async with aiohttp.ClientSession() as s, s.get(f"{sched.url}/api/v1/jobs",
                                                   headers=AUTH) as r:
        assert r.status == 200
        return (await r.json())["jobs"]


async def _finished(sched: Node, job_id: str) -> dict:
    job: dict = {}

    async def done() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"{sched.url}/api/v1/jobs/{job_id}",
                                                       headers=AUTH) as r:
            job.update(await r.json())
        return job["state"] in ("done", "failed")
    await until(done, 20, f"job {job_id} finished")
    return job


async def test_preheat_off_the_allow_list_is_refused_before_any_connection(
        cluster: Cluster, origin: CountingProxy, repo: str) -> None:
    async with Listener() as other:
        bare = await cluster.scheduler("--token", TOKEN)
        status, body = await _post(bare, {"image": f"http://{origin.host}/{repo}:v1"})
        assert status == 403 and "--allow-registry" in body["error"], body

        sched = await cluster.scheduler("--token", TOKEN, "--allow-registry", origin.url,
                                        name="listed")
        attempts = [
            {"image": f"http://127.0.0.1:{other.port}/{repo}:v1"},
            {"image": f"127.0.0.1:{other.port}/{repo}:v1"},
            {"url": f"http://127.0.0.1:{other.port}/anything"},
            {"image": f"localhost:{origin.port}/{repo}:v1"},  # another name, not the entry
            {"url": "http://169.254.169.254/latest/meta-data/iam"},
            {"url": f"https://{origin.host}/v2/{repo}/blobs/x"},  # not the entry's scheme
        ]
        for attempt in attempts:
            status, body = await _post(sched, attempt)
            assert status == 403, (attempt, status, body)
            assert "allow" in body["error"], body
        for attempt in ({"url": "file:///etc/passwd"}, {"url": "http://user:pw@x.example/y"},
                        {"image": "Not A Reference"}):
            status, body = await _post(sched, attempt)
            assert status == 400, (attempt, status, body)
        assert other.connections == 0, "a refused preheat reached the host"
        assert origin.connections == 0
        assert await _jobs(sched) == [] and await _jobs(bare) == []


async def test_preheat_follows_no_redirect_off_the_allow_list(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str) -> None:
    image = await push_image(registry.url, repo, "v1", [300_000])
    async with Redirector() as reg, Listener() as internal, \
            Listener("127.0.0.2") as internal2, Listener(open=False) as closed:
        sched = await cluster.scheduler("--token", TOKEN, "--allow-registry", reg.url,
                                        "--allow-registry", origin.url)
        errors = []
        for to in (f"http://127.0.0.1:{internal.port}/v2/{repo}/manifests/v1",
                   f"http://127.0.0.2:{internal2.port}/secret",
                   f"http://127.0.0.1:{closed.port}/v2/{repo}/manifests/v1",
                   "http://169.254.169.254/latest/meta-data/iam",
                   f"https://{origin.host}/v2/{repo}/manifests/v1",  # not the entry's scheme
                   "file:///etc/passwd"):
            reg.to = to
            status, job = await _post(sched, {"image": f"{reg.url}/{repo}:v1"})
            assert status == 202, job
            job = await _finished(sched, job["id"])
            assert job["state"] == "failed" and job["items"] == [], job
            errors.append(job["error"])
        assert internal.connections == 0 and internal2.connections == 0
        # Nothing tells an open port from a closed one, or names the target.
        assert len(set(errors)) == 1, errors
        listing = json.dumps(await _jobs(sched))
        for port in (internal.port, internal2.port, closed.port):
            assert str(port) not in listing, listing
        assert "169.254" not in listing and "internal data" not in listing

        # A redirect to an allow-listed registry is followed.
        reg.to = f"{origin.url}/v2/{repo}/manifests/v1"
        status, job = await _post(sched, {"image": f"{reg.url}/{repo}:v1"})
        assert status == 202

        async def resolved() -> bool:
            jobs = {j["id"]: j for j in await _jobs(sched)}
            return jobs[job["id"]]["state"] != "resolving"
        await until(resolved, 20, "the job resolved")
        got = {j["id"]: j for j in await _jobs(sched)}[job["id"]]
        assert got["state"] == "running", got
        assert {i["task_id"] for i in got["items"]} == \
            {image.config_digest, *(d for d, _ in image.layers)}


async def test_the_job_book_is_bounded(cluster: Cluster) -> None:
    unreachable = free_port()  # allow-listed, nothing listens: its jobs fail at once
    sched = await cluster.scheduler("--token", TOKEN, "--allow-registry",
                                    f"http://127.0.0.1:{unreachable}")
    failed = []
    for n in range(preheat.KEEP_FINISHED + 10):
        status, job = await _post(sched, {"image": f"127.0.0.1:{unreachable}/r/i:{n}"})
        assert status == 202, job
        assert (await _finished(sched, job["id"]))["state"] == "failed"
        failed.append(job["id"])
    # URL jobs wait for a seed that never comes: they stay under way.
    for n in range(preheat.MAX_RUNNING):
        status, job = await _post(sched, {"url": f"http://127.0.0.1:{unreachable}/f{n}"})
        assert status == 202, job
    status, body = await _post(sched, {"url": f"http://127.0.0.1:{unreachable}/one-more"})
    assert status == 429 and "under way" in body["error"], body
    jobs = await _jobs(sched)
    assert len(jobs) == preheat.KEEP_FINISHED + preheat.MAX_RUNNING
    kept = {j["id"] for j in jobs if j["state"] == "failed"}
    assert kept == set(failed[-preheat.KEEP_FINISHED:]), "not the most recent finished jobs"
    async with aiohttp.ClientSession() as s, s.get(f"{sched.url}/api/v1/jobs/{failed[0]}",
                                                   headers=AUTH) as r:
        assert r.status == 404


async def test_job_book_core_prunes_oldest_finished_and_expires_stuck_jobs() -> None:
    now = [1000.0]
    book = preheat.JobBook(max_running=2, keep_finished=3, clock=lambda: now[0])

    async def fails() -> list[preheat.Item]:
        raise preheat.PreheatError("no")

    async def hangs() -> list[preheat.Item]:
        await asyncio.Event().wait()
        return []

    try:
        first = [book.create(f"f{i}", fails) for i in range(2)]
        await asyncio.sleep(0.01)
        assert [j.state for j in first] == ["failed", "failed"]
        more = []
        for i in range(3):
            now[0] += 1
            more.append(book.create(f"g{i}", fails))
            await asyncio.sleep(0.01)
        assert set(book.jobs) == {j.id for j in more}  # the oldest finished went first
        stuck = [book.create("h1", hangs), book.create("h2", hangs)]
        with pytest.raises(RequestError) as refused:
            book.create("h3", hangs)
        assert refused.value.status == 429
        now[0] += preheat.JOB_SECONDS + 1  # the stuck ones fail, and make room
        book.create("h4", hangs)
        assert [j.state for j in stuck] == ["failed", "failed"]
        assert "not done after" in (stuck[0].error or "")
    finally:
        await book.close()
