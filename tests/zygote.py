"""Daemons forked from one process that has already imported naiad: the suite starts hundreds
of schedulers and peers, and each fresh interpreter spends about a CPU-second importing aiohttp,
pydantic and the rest before it does anything (on two cores, half the suite's CPU). A forked
daemon is still a real process of its own (its own pid, session, signals, sockets, log file),
started with the argv, working directory and environment the test gives it.

The zygote forks twice, so a daemon is orphaned at once and handed to the test process, which is
a child subreaper (prctl): the test waits for it, reads its exit status and signals it as it
would a `subprocess.Popen`. `ForkedProcess` is that handle; `spawn` in tests/cluster.py picks it
for `naiad scheduler` and `naiad peer` unless the environment differs in what is read at import.

Run as `python -m tests.zygote SOCKET`: it imports, listens on the Unix socket, and per request
(one JSON line: argv, cwd, env, log) answers the daemon's pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
DAEMONS = ("peer", "scheduler")


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")


# -- the zygote ----------------------------------------------------------------------------------

def _daemon(request: dict) -> None:
    """In the forked daemon: become what `Popen(argv, cwd, env, stdout=log, stderr=STDOUT,
    start_new_session=True)` would have started, run naiad, exit with its code."""
    code = 1
    try:
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        from naiad.cli import main
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # reported in the daemon's log, as Python would
        import traceback
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fork_daemon(request: dict, inherited: list[int]) -> int:
    """Fork an intermediate that forks the daemon and exits: the daemon is orphaned and
    reparented to the test process (the subreaper) before the pid is answered."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(read)
        pid = os.fork()
        if pid == 0:
            os.close(write)
            for fd in inherited:  # the zygote's sockets are not the daemon's
                os.close(fd)
            sys.argv = [str(Path(sys.modules["naiad"].__file__).with_name("__main__.py")),
                        *request["argv"]]
            _daemon(request)
        os.write(write, str(pid).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(middle, 0)
    return int(answer)


def serve(path: str) -> None:
    parent = os.getppid()
    import naiad.cli  # noqa: F401 - the imports every daemon shares, done once
    import peer.daemon  # noqa: F401
    import scheduler.server  # noqa: F401
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(16)
        listener.settimeout(1.0)
        print("ready", flush=True)
        while os.getppid() == parent:  # the zygote goes with the test process
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            with conn, conn.makefile("rwb") as f:
                request = json.loads(f.readline())
                pid = _fork_daemon(request, [listener.fileno(), conn.fileno()])
                f.write(f"{pid}\n".encode())
                f.flush()


# -- the test process's side ---------------------------------------------------------------------

class ForkedProcess:
    """A daemon the zygote forked, waited for by this (subreaper) process: the part of
    `subprocess.Popen` the tests use."""

    def __init__(self, pid: int, argv: list[str]) -> None:
        self.pid = pid
        self.args = argv
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def _reap(self, flags: int) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, flags)
                except ChildProcessError:
                    return self.returncode
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            code = self._reap(0)
            assert code is not None
            return code
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.02)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never a signal to a pid already reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The zygote process of this test process, started on first use."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="naiad-zygote-")
        self.path = os.path.join(self._dir, "sock")
        self.env = dict(os.environ)  # what the zygote imported under
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", self.path],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     env=self.env,
                                     cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the test zygote did not start (exit {self.proc.wait()})")

    def fork(self, argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> ForkedProcess:
        request = {"argv": argv, "cwd": str(cwd), "env": env, "log": str(log)}
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.path)
            with s.makefile("rwb") as f:
                f.write(json.dumps(request).encode() + b"\n")
                f.flush()
                pid = int(f.readline())
        return ForkedProcess(pid, [sys.executable, "-m", "naiad", *argv])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self._dir)


_zygote: Zygote | None = None


def zygote() -> Zygote:
    global _zygote
    if _zygote is None:
        import atexit
        _zygote = Zygote()
        atexit.register(_zygote.stop)
    return _zygote


# What naiad reads from the environment only when it runs, never at import: a daemon forked
# with other values of these is as one started fresh. Anything else (PYTHONPATH, SSL_CERT_FILE,
# which aiohttp reads at import) differing from the zygote's own environment means a fresh one.
CALL_TIME_ENV = ("NAIAD_", "XDG_", "HF_", "PYTEST_")


def forkable(argv: list[str], env: dict[str, str]) -> bool:
    """Whether `argv` is a naiad daemon the zygote can start as a fresh interpreter would."""
    if not (argv[:3] == [sys.executable, "-m", "naiad"] and len(argv) > 3
            and argv[3] in DAEMONS):
        return False
    mine = zygote().env
    return all(k.startswith(CALL_TIME_ENV) for k in mine.keys() ^ env.keys()
               | {k for k in mine.keys() & env.keys() if mine[k] != env[k]})


if __name__ == "__main__":
    serve(sys.argv[1])
