"""Real clients through naiad peers: skopeo (registries.conf mirror) and containerd (hosts.toml
mirror, `?ns=`), against a real docker-registry. Once one peer holds an image, a pull through
another peer moves no layer bytes from the registry."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from tests.cluster import Cluster, CountingProxy, Registry, metric, spawn, until
from tests.images import push_image

KiB, MiB = 1 << 10, 1 << 20
SMALL = 64 * KiB  # manifests, configs, /v2/ pings and HEADs: never a layer


async def _run(*argv: str, seconds: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds)
    return proc.returncode, out.decode(errors="replace")


def _registries_conf(path: Path, registry: str, mirror: str) -> Path:
    path.write_text(f"""
[[registry]]
location = "{registry}"
insecure = true
[[registry.mirror]]
location = "{mirror}"
insecure = true
""")
    return path


async def test_skopeo_copy_through_peers(cluster: Cluster, registry: Registry,
                                         origin: CountingProxy, repo: str,
                                         tmp_path: Path) -> None:
    skopeo = shutil.which("skopeo")
    assert skopeo, "skopeo is not installed (.ci/run installs it)"
    image = await push_image(registry.url, repo, "v1", [3 * MiB, 5 * MiB + 7, 700 * KiB])
    sched = await cluster.scheduler()
    a, b = await asyncio.gather(cluster.peer("a", sched.url, origin.url),
                                cluster.peer("b", sched.url, origin.url))
    ref = f"docker://{origin.host}/{repo}:v1"

    for peer, out in ((a, "first"), (b, "second")):
        conf = _registries_conf(tmp_path / f"{peer.name}.conf", origin.host,
                                peer.url.removeprefix("http://"))
        before = origin.bytes_down
        served = await metric(peer.url, "naiad_peer_served_bytes_total")
        rc, text = await _run(skopeo, "--registries-conf", str(conf), "copy",
                              "--src-tls-verify=false", ref, f"dir:{tmp_path / out}")
        assert rc == 0, text
        for digest, size in image.layers:
            assert (tmp_path / out / digest.split(":")[1]).stat().st_size == size
        # The layers came through the peer (skopeo did not fall back to the registry).
        assert await metric(peer.url, "naiad_peer_served_bytes_total") - served \
            >= image.layer_bytes
        sent = origin.bytes_down - before
        if peer is a:
            assert sent <= 1.1 * image.layer_bytes + SMALL
        else:
            assert sent < SMALL, f"the second copy moved {sent} bytes from the registry"
    assert await metric(b.url, "naiad_peer_download_bytes_total",
                        {"source": "peer"}) >= image.layer_bytes


class Containerd:
    """A private containerd daemon: its own root, state dir and socket, no CRI."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "containerd.sock"
        config = workdir / "config.toml"
        config.write_text(f"""version = 2
root = "{workdir / 'root'}"
state = "{workdir / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.socket}"
""")
        binary = shutil.which("containerd")
        assert binary, "containerd is not installed (.ci/run installs it)"
        self.proc = spawn("containerd", [binary, "--config", str(config)], workdir)

    async def ready(self) -> None:
        async def answers() -> bool:
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{self.proc.logs()}")
            rc, _ = await _run("ctr", "--address", str(self.socket), "version", seconds=10)
            return rc == 0
        await until(answers, 30, "containerd answering")

    async def pull(self, ref: str, hosts_dir: Path) -> tuple[int, str]:
        return await _run("ctr", "--address", str(self.socket), "images", "pull",
                          "--plain-http", "--hosts-dir", str(hosts_dir), ref)

    def stop(self) -> None:
        self.proc.stop()


async def _hosts_dir(path: Path, registry: str, mirror: str) -> Path:
    """containerd's hosts directory as a node gets it: written by `naiad containerd-config`."""
    rc, text = await _run(sys.executable, "-m", "naiad", "containerd-config", "--dir", str(path),
                          "--registry", registry, "--peer", mirror, seconds=30)
    assert rc == 0, text
    return path


async def test_containerd_pull_through_peers(cluster: Cluster, registry: Registry,
                                             origin: CountingProxy, repo: str,
                                             tmp_path: Path) -> None:
    image = await push_image(registry.url, repo, "v1", [2 * MiB, 4 * MiB + 3])
    sched = await cluster.scheduler()
    # The peers' default registry is unreachable: the upstream can only come from `?ns=`.
    a, b = await asyncio.gather(*(
        cluster.peer(n, sched.url, "https://registry.invalid", "--allow-registry", origin.url)
        for n in ("a", "b")))
    ref = f"{origin.host}/{repo}:v1"
    daemons = []
    try:
        for peer in (a, b):
            workdir = tmp_path / f"containerd-{peer.name}"
            workdir.mkdir()
            daemon = Containerd(workdir)
            daemons.append(daemon)
            await daemon.ready()
            hosts = await _hosts_dir(tmp_path / f"hosts-{peer.name}", origin.url, peer.url)
            before = origin.bytes_down
            served = await metric(peer.url, "naiad_peer_served_bytes_total")
            rc, text = await daemon.pull(ref, hosts)
            assert rc == 0, text
            assert "unpacking" in text.lower()
            assert await metric(peer.url, "naiad_peer_served_bytes_total") - served \
                >= image.layer_bytes
            sent = origin.bytes_down - before
            if peer is a:
                assert sent <= 1.1 * image.layer_bytes + SMALL
            else:
                assert sent < SMALL, f"the second pull moved {sent} bytes from the registry"
            rc, text = await _run("ctr", "--address", str(daemon.socket), "images", "ls",
                                  "--quiet")
            assert ref in text.split()
    finally:
        for daemon in daemons:
            daemon.stop()
    assert json.loads(image.manifest)["layers"]
