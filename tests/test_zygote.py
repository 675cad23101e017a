"""The harness's forked daemons behave as the processes `subprocess.Popen` would start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import Cluster, naiad, spawn, wait_http
from tests.zygote import ForkedProcess, forkable, zygote


def test_only_daemons_under_the_zygotes_own_interpreter_settings_are_forked() -> None:
    env = dict(zygote().env)
    assert forkable(naiad("peer", "--id", "a"), env)
    assert forkable(naiad("scheduler"), {**env, "XDG_CONFIG_HOME": "/x", "NAIAD_TOKEN": "t"})
    assert not forkable(naiad("get", "http://x"), env)  # the CLI runs as users run it
    assert not forkable(["redis-server"], env)
    assert not forkable(naiad("peer"), {**env, "SSL_CERT_FILE": "/ca.pem"})
    assert not forkable(naiad("peer"), {**env, "PYTHONPATH": "/elsewhere"})
    without = {k: v for k, v in env.items() if k != "PATH"}
    assert not forkable(naiad("peer"), without)


async def test_a_forked_scheduler_has_its_own_pid_session_log_and_exit_status(
        cluster: Cluster, tmp_path: Path) -> None:
    node = await cluster.scheduler("--token", "op")
    proc = node.proc.popen
    assert isinstance(proc, ForkedProcess) and proc.pid != os.getpid()
    assert os.getsid(proc.pid) == proc.pid  # a session of its own, as start_new_session
    assert Path(f"/proc/{proc.pid}/cwd").resolve() == cluster.workdir.resolve()
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.05)
    assert "scheduler" in node.proc.logs()
    assert node.proc.stop(signal.SIGKILL) == -signal.SIGKILL
    assert proc.poll() == -signal.SIGKILL
    proc.send_signal(signal.SIGTERM)  # a pid it no longer owns is never signalled

    # A bad argument: the one clear line and exit status 2, as from a fresh interpreter.
    bad = spawn("bad", naiad("scheduler", "--listen", "nowhere"), tmp_path)
    assert bad.popen.wait(20) == 2
    assert bad.logs().startswith("naiad scheduler: ") and "Traceback" not in bad.logs()
    assert sys.executable in bad.popen.args


async def test_a_sigterm_ends_a_forked_peer_cleanly(cluster: Cluster) -> None:
    sched = await cluster.scheduler()
    peer = await cluster.peer("p", sched.url, "http://127.0.0.1:9")
    await wait_http(f"{peer.url}/healthy")
    assert peer.proc.stop(signal.SIGTERM) == 0
