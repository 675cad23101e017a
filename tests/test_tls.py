"""`--tls-cert` / `--tls-key`: the scheduler's API and a peer's mirror port speak HTTPS; peers
reach an https scheduler, clients pull through an https mirror, and plain HTTP is refused."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import Cluster, CountingProxy, Registry, push_blob, self_signed_cert


async def test_https_scheduler_and_mirror(cluster: Cluster, registry: Registry,
                                          origin: CountingProxy, repo: str,
                                          tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    cluster.ssl = ssl.create_default_context(cafile=str(cert))
    blob = os.urandom(3 << 20)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler(tls=(cert, key))
    assert sched.url.startswith("https://")
    trust = {"SSL_CERT_FILE": str(cert)}  # how a peer is told to trust a private CA
    a = await cluster.peer("a", sched.url, origin.url, tls=(cert, key), env=trust)
    b = await cluster.peer("b", sched.url, origin.url, env=trust)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a.url}/v2/{repo}/blobs/{digest}", ssl=cluster.ssl) as r:
            assert r.status == 200 and await r.read() == blob
        async with s.get(f"{b.url}/v2/{repo}/blobs/{digest}") as r:
            assert await r.read() == blob
            assert r.headers["X-Naiad-Source"] == "peer"  # the https scheduler sent b to a
        # Plain HTTP to an HTTPS port gets no answer at all.
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://{a.url.removeprefix('https://')}/healthy") as r:
                await r.read()


@pytest.mark.parametrize("args, says", [
    (["--tls-cert", "/nonexistent.pem"], "go together"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "cannot load"),
])
def test_bad_tls_options_are_refused(args: list[str], says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "naiad", "scheduler", "--listen",
                           "127.0.0.1:0", "--udp", "off", *args], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and says in done.stderr + done.stdout
