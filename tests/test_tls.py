"""`--tls-cert` / `--tls-key`: the scheduler's API and a peer's mirror and upload ports speak
HTTPS; peers reach an https scheduler, clients pull through an https mirror, peers exchange
pieces over TLS, verifying each other against `--tls-ca` (mutual TLS when both sides have
certificates), and plain HTTP is refused."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import (
    Cluster,
    CountingProxy,
    Registry,
    member_session,
    metric,
    pull_digest,
    push_blob,
    self_signed_cert,
)

MiB = 1 << 20


class CertAuthority:
    """A certificate authority of the test's own (openssl) and the leaf certificates it signs,
    each for 127.0.0.1 and good as server and as client certificate."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        workdir.mkdir(parents=True)
        self.cert, self.key = workdir / "ca.pem", workdir / "ca.key"
        _openssl("req", "-x509", *_EC, "-days", "2", "-keyout", self.key, "-out", self.cert,
                 "-subj", f"/CN=naiad test CA {workdir.name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(self, name: str) -> tuple[Path, Path]:
        cert, key, csr = (self.dir / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
        ext = self.dir / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                       "extendedKeyUsage=serverAuth,clientAuth\n"
                       "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
        _openssl("req", "-new", *_EC, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
                 "-CAcreateserial", "-days", "2", "-out", cert, "-extfile", ext)
        return cert, key

    def client(self, leaf: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client context trusting this CA, presenting `leaf` if given."""
        context = ssl.create_default_context(cafile=str(self.cert))
        if leaf is not None:
            context.load_cert_chain(*leaf)
        return context


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


async def _refused(url: str, context: ssl.SSLContext | bool) -> bool:
    """Whether a GET of `url` fails to get any answer (the connection is refused or torn)."""
    try:
        async with aiohttp.ClientSession() as s, s.get(
                url, ssl=context, timeout=aiohttp.ClientTimeout(total=10)) as r:
            await r.read()
    except aiohttp.ClientError:
        return True
    return False


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


async def test_peers_exchange_pieces_over_mutual_tls(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    ca, stranger = CertAuthority(tmp_path / "ca"), CertAuthority(tmp_path / "stranger")
    cluster.ssl = ca.client()
    blob = os.urandom(2 * MiB) + bytes(2 * MiB) + os.urandom(1)  # raw and zstd pieces
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    mtls = ("--tls-ca", str(ca.cert), "--piece-size", "1MiB")
    a = await cluster.peer("a", sched.url, origin.url, *mtls, tls=ca.leaf("a"))
    b_leaf = ca.leaf("b")
    b = await cluster.peer("b", sched.url, origin.url, *mtls, tls=b_leaf)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a.url}/v2/{repo}/blobs/{digest}", ssl=cluster.ssl) as r:
            assert r.status == 200 and await r.read() == blob
        before = origin.bytes_down
        async with s.get(f"{b.url}/v2/{repo}/blobs/{digest}", ssl=cluster.ssl) as r:
            assert r.status == 200 and await r.read() == blob
            assert r.headers["X-Naiad-Source"] == "peer"
    assert origin.bytes_down - before < 64 << 10  # the pieces came from a, over TLS
    async with member_session() as s, s.get(f"{sched.url}/api/v1/peers/a") as r:
        assert (await r.json())["upload_addr"] == f"https://127.0.0.1:{a.extra['upload']}"
    upload = f"127.0.0.1:{a.extra['upload']}"
    assert await _refused(f"http://{upload}/healthy", False)  # plain HTTP: no answer
    assert await _refused(f"https://{upload}/healthy", ca.client())  # no client certificate
    assert await _refused(f"https://{upload}/healthy", ca.client(stranger.leaf("x")))
    assert not await _refused(f"https://{upload}/healthy", ca.client(b_leaf))  # a member


async def test_a_parent_the_ca_does_not_vouch_for_gets_no_trust(
        cluster: Cluster, registry: Registry, origin: CountingProxy, repo: str,
        tmp_path: Path) -> None:
    ca, stranger = CertAuthority(tmp_path / "ca"), CertAuthority(tmp_path / "stranger")
    cluster.ssl = ca.client()
    blob = os.urandom(3 * MiB + 5)
    digest = await push_blob(registry.url, repo, blob)
    sched = await cluster.scheduler()
    # a's upload port is TLS with a certificate of `ca`, not asking for client certificates.
    a = await cluster.peer("a", sched.url, origin.url, "--piece-size", "1MiB",
                           tls=ca.leaf("a"))
    async with aiohttp.ClientSession() as s, \
            s.get(f"{a.url}/v2/{repo}/blobs/{digest}", ssl=cluster.ssl) as r:
        assert r.status == 200 and await r.read() == blob
    # d trusts ca: its pieces come from a. c trusts only another CA: it takes nothing from a
    # and gets the exact bytes from the origin (d, a plain-HTTP holder, has left by then).
    d = await cluster.peer("d", sched.url, origin.url, "--tls-ca", str(ca.cert))
    assert await pull_digest(f"{d.url}/v2/{repo}/blobs/{digest}") == digest
    assert await metric(d.url, "naiad_peer_download_bytes_total",
                        {"source": "peer"}) == len(blob)
    assert d.proc.stop() == 0  # SIGTERM: it leaves the scheduler
    c = await cluster.peer("c", sched.url, origin.url, "--tls-ca", str(stranger.cert))
    async with aiohttp.ClientSession() as s, s.get(f"{c.url}/v2/{repo}/blobs/{digest}") as r:
        assert r.status == 200 and await r.read() == blob
    # c was sent to a and refused it (its report is what marks a), not merely never sent.
    async with member_session() as s, s.get(f"{sched.url}/api/v1/peers/a") as r:
        assert (await r.json())["penalty_reason"] == "failed"
    assert await metric(c.url, "naiad_peer_download_bytes_total", {"source": "peer"}) == 0
    assert await metric(c.url, "naiad_peer_download_bytes_total",
                        {"source": "origin"}) == len(blob)
