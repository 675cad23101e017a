"""The `naiad` command as users run it: the demo, refusals at start-up, status."""

from __future__ import annotations

import asyncio
import re
import sys

from tests.cluster import Cluster, CountingProxy, free_port


async def _run(*args: str, seconds: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds)
    return proc.returncode, out.decode()


async def test_demo_prints_its_saving_and_exits_zero() -> None:
    rc, out = await _run("demo")
    assert rc == 0, out
    assert "sha256 ok" in out and "FAILED" not in out
    saving = float(re.search(r"backbone saving ([\d.]+)%", out).group(1))
    assert saving >= 70.0, out  # 4 peers: the registry should send each blob about once


async def test_refuses_exposed_listener_without_cluster_secret() -> None:
    port = free_port()
    rc, out = await _run("scheduler", "--listen", f"0.0.0.0:{port}", seconds=30)
    assert rc == 2 and "cluster-secret" in out
    rc, out = await _run("peer", "--listen", f"0.0.0.0:{port}", "--data-dir", "/tmp/x",
                         seconds=30)
    assert rc == 2 and "cluster-secret" in out


async def test_bad_option_values_are_refused_with_the_option_named() -> None:
    rc, out = await _run("peer", "--upload-slots", "many", seconds=30)
    assert rc == 2 and "upload_slots" in out


async def test_a_registry_url_that_is_not_http_is_one_line(tmp_path) -> None:
    for flag in ("--registry", "--allow-registry"):
        rc, out = await _run("peer", flag, "ftp://x", "--data-dir", str(tmp_path), seconds=30)
        assert rc == 2 and out == f"naiad peer: {flag}: not an http(s) registry URL: 'ftp://x'\n"


async def test_status_summarises_the_cluster(cluster: Cluster, origin: CountingProxy) -> None:
    sched = await cluster.scheduler()
    await cluster.peer("alpha", sched.url, origin.url, "--idc", "dc1")
    rc, out = await _run("status", "--scheduler", sched.url, seconds=30)
    assert rc == 0, out
    assert "peers 1" in out and "alpha" in out
    rc, out = await _run("status", "--scheduler", f"http://127.0.0.1:{free_port()}",
                         seconds=30)
    assert rc == 1 and "unreachable" in out
