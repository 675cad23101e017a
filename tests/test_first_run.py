"""A first run as a new user makes it: every command's --help, every start-up mistake a user can
cause, and a dependency that is down (DESIGN: "Start-up and failure reporting").

A mistake is exit status 2 and exactly one line `naiad <command>: <reason>` on stderr: no
traceback, no "Unclosed client session". A dependency that is down (Redis, every scheduler) is
no mistake: the daemon starts, warns in plain lines, at most one per retry period, and recovers
by itself once the dependency is back."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from naiad.cli import build_parser
from peer.store import ChunkStore
from tests.cluster import (
    Cluster,
    Proc,
    free_port,
    naiad,
    spawn,
    until,
    wait_http,
    wait_registered_peer,
)

SECONDS = 30  # a start-up check answers at once; a daemon that did start is a failure


def subcommands() -> list[str]:
    """Every subcommand, read from the parser: a new one is covered without a list to update."""
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "naiad", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"naiad {' '.join(args)} did not exit: it started") from None
    return proc.returncode, out.decode(), err.decode()


# --- help -------------------------------------------------------------------------------------

def test_subcommands_are_discovered() -> None:
    assert {"scheduler", "peer", "get", "check-store"} <= set(subcommands())


@pytest.mark.parametrize("command", ["", *subcommands()])
async def test_help_works(command: str) -> None:
    argv = [command, "--help"] if command else ["--help"]
    rc, out, err = await run(*argv)
    assert rc == 0, err
    assert err == ""
    assert out.startswith(f"usage: naiad {command}".rstrip()), out[:200]
    if command in ("scheduler", "peer"):  # every option documented, the `%` of a help too
        assert "--config" in out and "--log-level" in out
    if command == "peer":
        assert "above 95%, down to 85%" in " ".join(out.split())


# --- start-up mistakes ------------------------------------------------------------------------

@pytest.fixture
def busy() -> Iterator[tuple[int, int]]:
    """A TCP port someone listens on, and a UDP port someone holds."""
    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        yield tcp.getsockname()[1], udp.getsockname()[1]


@pytest.fixture
def readonly(tmp_path: Path) -> Iterator[Path]:
    """A read-only directory (a read-only bind mount, so root is refused too) holding `store`,
    a peer's store made before, and nothing else."""
    src, ro = tmp_path / "ro-src", tmp_path / "ro"
    (src / "store").mkdir(parents=True)
    ro.mkdir()
    store = ChunkStore(src / "store")
    store.open()
    store.close()
    mount = ["mount", "--bind", str(src), str(ro)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a read-only directory")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def _peer(tmp: Path, *args: str) -> list[str]:
    """A peer that would start (loopback, any free ports, its own data directory) but for
    `args`, which come last and so win."""
    return ["peer", "--listen", "127.0.0.1:0", "--upload", "127.0.0.1:0", "--data-dir",
            str(tmp / "data"), "--scheduler", f"http://127.0.0.1:{free_port()}", *args]


def _scheduler(*args: str) -> list[str]:
    return ["scheduler", "--listen", "127.0.0.1:0", "--udp", "off", *args]


def _toml(tmp: Path, text: str) -> str:
    path = tmp / "naiad.toml"
    path.write_text(text)
    return str(path)


def _file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("not a directory")
    return path


Case = Callable[[Path, tuple[int, int]], list[str]]
# (name, argv given a work dir and the busy ports, what the one line must say, environment)
MISTAKES: list[tuple[str, Case, list[str], dict[str, str]]] = [
    ("scheduler-listen-in-use", lambda t, b: _scheduler("--listen", f"127.0.0.1:{b[0]}"),
     ["--listen 127.0.0.1:", "address already in use"], {}),
    ("scheduler-udp-in-use", lambda t, b: _scheduler("--udp", f"127.0.0.1:{b[1]}"),
     ["--udp 127.0.0.1:", "address already in use"], {}),
    ("peer-mirror-in-use", lambda t, b: _peer(t, "--listen", f"127.0.0.1:{b[0]}"),
     ["--listen 127.0.0.1:", "address already in use"], {}),
    ("peer-upload-in-use", lambda t, b: _peer(t, "--upload", f"127.0.0.1:{b[0]}"),
     ["--upload 127.0.0.1:", "address already in use"], {}),
    ("listen-not-an-address", lambda t, b: _scheduler("--listen", "localhost"),
     ["listen", "HOST:PORT"], {}),
    ("port-out-of-range", lambda t, b: _peer(t, "--upload", "127.0.0.1:70000"),
     ["upload", "out of range"], {}),
    ("data-dir-is-a-file", lambda t, b: _peer(t, "--data-dir", str(_file(t))),
     ["--data-dir", "a-file", "not a directory"], {}),
    ("data-dir-under-a-file", lambda t, b: _peer(t, "--data-dir", str(_file(t) / "d")),
     ["--data-dir", "a-file", "not a directory"], {}),
    ("config-missing", lambda t, b: _peer(t, "--config", str(t / "nope.toml")),
     ["nope.toml", "no such file"], {}),
    ("config-from-env-missing", lambda t, b: _peer(t), ["nowhere.toml"],
     {"NAIAD_CONFIG": "/nowhere.toml"}),
    ("config-malformed", lambda t, b: _peer(t, "--config", _toml(t, "listen = 0.0.0.0:1\n")),
     ["naiad.toml", "config file"], {}),
    ("config-unknown-option", lambda t, b: _peer(t, "--config", _toml(t, "uplod-slots = 3\n")),
     ["naiad.toml", "uplod-slots"], {}),
    ("config-unknown-in-table", lambda t, b: _scheduler(
        "--config", _toml(t, "[scheduler]\nseed = true\n")), ["[scheduler]", "seed"], {}),
    ("config-value-out-of-range", lambda t, b: _peer(
        t, "--config", _toml(t, "[peer]\nupload-slots = 0\n")), ["upload_slots", "at least 1"],
     {}),
    ("flag-out-of-range", lambda t, b: _scheduler("--heartbeat-interval", "0"),
     ["heartbeat_interval", "more than 0"], {}),
    ("env-out-of-range", lambda t, b: _peer(t), ["origin_concurrency", "NAIAD_ORIGIN"],
     {"NAIAD_ORIGIN_CONCURRENCY": "-2"}),
    ("piece-size-not-a-power-of-two", lambda t, b: _peer(t, "--piece-size", "3M"),
     ["piece_size", "power of two"], {}),
    ("not-a-number", lambda t, b: _peer(t, "--upload-slots", "many"), ["upload_slots"], {}),
    ("log-level", lambda t, b: _peer(t, "--log-level", "loud"), ["log_level", "loud"], {}),
    ("tls-cert-missing", lambda t, b: _scheduler("--tls-cert", str(t / "c.pem"), "--tls-key",
                                                 str(t / "k.pem")), ["--tls-cert", "c.pem"], {}),
    ("tls-key-alone", lambda t, b: _peer(t, "--tls-key", str(t / "k.pem")),
     ["--tls-cert and --tls-key"], {}),
    ("tls-ca-missing", lambda t, b: _peer(t, "--tls-ca", str(t / "ca.pem")),
     ["--tls-ca", "ca.pem"], {}),
    ("registry-not-http", lambda t, b: _peer(t, "--registry", "ftp://r"),
     ["--registry", "ftp://r"], {}),
    ("allow-registry-not-http", lambda t, b: _scheduler("--allow-registry", "ftp://r"),
     ["--allow-registry", "ftp://r"], {}),
    ("scheduler-url-not-http", lambda t, b: _peer(t, "--scheduler", "ftp://s"),
     ["scheduler", "ftp://s"], {}),
    ("redis-url-not-redis", lambda t, b: _scheduler("--redis", "127.0.0.1:6379"),
     ["redis", "127.0.0.1:6379"], {}),
    ("unknown-flag", lambda t, b: _peer(t, "--uplod-slots", "3"), ["--uplod-slots"], {}),
    ("check-store-not-a-store", lambda t, b: ["check-store", "--data-dir", str(t)],
     ["--data-dir", "not a peer's store"], {}),
    ("check-store-missing", lambda t, b: ["check-store", "--data-dir", str(t / "gone")],
     ["--data-dir", "no such directory"], {}),
    ("check-store-a-file", lambda t, b: ["check-store", "--data-dir", str(_file(t))],
     ["--data-dir", "not a directory"], {}),
    ("get-output-dir-missing", lambda t, b: ["get", "http://r/f", "-o", str(t / "no" / "f")],
     ["-o", "no directory"], {}),
    ("get-peer-not-http", lambda t, b: ["get", "http://r/f", "-o", str(t / "f"), "--peer",
                                        "ftp://p"], ["--peer", "ftp://p"], {}),
    ("get-bad-digest", lambda t, b: ["get", "http://r/f", "-o", str(t / "f"), "--digest",
                                     "md5:x"], ["--digest", "md5:x"], {}),
    ("demo-no-peers", lambda t, b: ["demo", "--peers", "0"], ["--peers"], {}),
    ("status-scheduler-not-http", lambda t, b: ["status", "--scheduler", "ftp://s"],
     ["--scheduler", "ftp://s"], {}),
    ("preheat-scheduler-not-http", lambda t, b: ["preheat", "r/x:1", "--scheduler", "s:8002"],
     ["--scheduler", "s:8002"], {}),
]


def _one_line(rc: int, out: str, err: str, command: str, says: list[str]) -> None:
    assert rc == 2, err
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith(f"naiad {command}: "), err
    for text in says:
        assert text in err, err


@pytest.mark.parametrize(("argv", "says", "env"), [m[1:] for m in MISTAKES],
                         ids=[m[0] for m in MISTAKES])
async def test_a_start_up_mistake_is_one_line(tmp_path: Path, busy: tuple[int, int],
                                              argv: Case, says: list[str],
                                              env: dict[str, str]) -> None:
    args = argv(tmp_path, busy)
    _one_line(*await run(*args, env=env), args[0], says)


@pytest.mark.parametrize("where", ["new", "store"])
async def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path: Path, readonly: Path,
                                                            where: str) -> None:
    """Neither made (its parent is read-only) nor written (a store on a read-only mount)."""
    rc, out, err = await run(*_peer(tmp_path, "--data-dir", str(readonly / where)))
    _one_line(rc, out, err, "peer", [f"--data-dir {readonly / where}", "read-only"])
    assert not (readonly / "new").exists()


async def test_check_store_on_a_read_only_store_is_one_line(readonly: Path) -> None:
    rc, out, err = await run("check-store", "--data-dir", str(readonly / "store"))
    _one_line(rc, out, err, "check-store", ["--data-dir", "read-only"])


async def test_check_store_does_not_make_a_store_of_a_mistyped_directory(
        tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    rc, _, err = await run("check-store", "--data-dir", str(tmp_path / "photos"))
    assert rc == 2, err
    assert list((tmp_path / "photos").iterdir()) == []
    rc, out, err = await run("check-store", "--data-dir", str(_store_made(tmp_path)))
    assert (rc, err) == (0, ""), err
    assert "0 pieces checked, 0 dropped" in out


def _store_made(tmp: Path) -> Path:
    store = ChunkStore(tmp / "store")
    store.open()
    store.close()
    return store.root


# --- a dependency that is down ----------------------------------------------------------------

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) +([\w.]+): (.*)$")


def _warnings(text: str) -> list[tuple[float, str]]:
    """(time, message) of each warning; every line must be one plain log line."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        assert m, f"not a plain log line (a traceback?): {line!r}"
        assert m.group(2) not in ("ERROR", "CRITICAL"), line
        if m.group(2) == "WARNING":
            when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((when, f"{m.group(3)}: {m.group(4)}"))
    return out


def _at_most_one_per_period(warnings: list[tuple[float, str]]) -> None:
    """Warnings of one kind (the same text but for its numbers) come no more often than the
    retry period the previous one announced (`… in 2.0 s`), or once a second if it named
    none."""
    last: dict[str, tuple[float, float]] = {}
    for when, message in warnings:
        kind = re.sub(r"\d+(\.\d+)?", "#", message)
        period = re.search(r"\bin (\d+(?:\.\d+)?) ?s\b", message)
        if kind in last:
            previous, wait = last[kind]
            assert when - previous >= wait - 0.05, (
                f"{message!r} {when - previous:.2f} s after the previous one, its period "
                f"{wait} s")
        last[kind] = (when, float(period.group(1)) if period else 1.0)


def _redis(port: int, workdir: Path) -> Proc:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    return spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no"], workdir)


async def _status(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status


WATCH = 6.0  # seconds a daemon is watched with its dependency down: past the longest backoff


async def test_scheduler_with_redis_down_starts_warns_plainly_and_recovers(
        tmp_path: Path) -> None:
    redis_port, port = free_port(), free_port()
    proc = spawn("scheduler", naiad(*_scheduler("--listen", f"127.0.0.1:{port}", "--redis",
                                                f"redis://127.0.0.1:{redis_port}/0")), tmp_path)
    redis = None
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/healthy", proc=proc)  # ready: it does not need Redis for that
        assert await _status(f"{url}/api/v1/stats") == 503  # what needs the store says so
        seen = len(proc.logs().splitlines())
        await asyncio.sleep(WATCH)  # what it logs over a while is the point
        assert proc.popen.poll() is None, proc.logs()
        assert await _status(f"{url}/healthy") == 200
        warnings = _warnings("\n".join(proc.logs().splitlines()[seen:]))
        assert warnings, proc.logs()  # it does say Redis is down
        assert any(f"127.0.0.1:{redis_port}" in m for _, m in warnings), warnings
        _at_most_one_per_period(warnings)

        redis = _redis(redis_port, tmp_path)

        async def serves() -> bool:
            return await _status(f"{url}/api/v1/stats") == 200

        await until(serves, 20, "the scheduler serving once Redis is up")
        _warnings(proc.logs())  # and never a traceback, then either
    finally:
        proc.stop()
        if redis is not None:
            redis.stop()


async def test_peer_with_every_scheduler_down_serves_warns_plainly_and_recovers(
        cluster: Cluster) -> None:
    first, second = free_port(), free_port()
    peer = await cluster.peer("p1", f"http://127.0.0.1:{first}", "http://127.0.0.1:1",
                              "--scheduler", f"http://127.0.0.1:{second}",
                              wait_registered=False)
    seen = len(peer.proc.logs().splitlines())
    await asyncio.sleep(WATCH / 2)  # what it logs over a while is the point
    assert await _status(f"{peer.url}/healthy") == 200
    warnings = _warnings("\n".join(peer.proc.logs().splitlines()[seen:]))
    everything = [m for _, m in _warnings(peer.proc.logs())]
    for port in (first, second):  # each scheduler said to be down, plainly
        assert any(f"127.0.0.1:{port}" in m for m in everything), everything
    _at_most_one_per_period(warnings)

    sched = await cluster.scheduler(port=first)
    await wait_registered_peer(sched.url, "p1")
    _warnings(peer.proc.logs())
