"""`naiad containerd-config`: the hosts.toml text containerd reads (reference/clients.md), one
per registry name, written atomically and left untouched when it says the same already; a
mistake is one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from naiad import containerd

PEER = "http://127.0.0.1:65001"


def _naiad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "naiad", "containerd-config", *args],
                          capture_output=True, text=True, timeout=30)


# --- the text ---------------------------------------------------------------------------------

def test_render_is_the_hosts_toml_containerd_reads() -> None:
    parsed = tomllib.loads(containerd.render("https://ghcr.io", PEER))
    assert parsed == {"server": "https://ghcr.io",
                      "host": {PEER: {"capabilities": ["pull", "resolve"]}}}


@pytest.mark.parametrize("name", ["docker.io", "index.docker.io", "registry-1.docker.io",
                                  "https://Docker.IO"])
def test_docker_hub_by_any_name_is_written_under_each(name: str) -> None:
    files = containerd.plan([name], PEER)
    assert sorted(files) == ["docker.io", "index.docker.io", "registry-1.docker.io"]
    for text in files.values():
        assert tomllib.loads(text)["server"] == "https://registry-1.docker.io"


def test_registries_keep_their_scheme_and_port() -> None:
    files = containerd.plan(["ghcr.io:443", "http://127.0.0.1:5000", "Quay.io"], PEER + "/")
    assert sorted(files) == ["127.0.0.1:5000", "ghcr.io", "quay.io"]
    servers = {h: tomllib.loads(t)["server"] for h, t in files.items()}
    assert servers == {"127.0.0.1:5000": "http://127.0.0.1:5000", "ghcr.io": "https://ghcr.io",
                       "quay.io": "https://quay.io"}
    assert all(PEER in tomllib.loads(t)["host"] for t in files.values()), "no trailing slash"


@pytest.mark.parametrize(("registries", "peer", "option"), [
    ([], PEER, "--registry"),
    (["ftp://registry.example"], PEER, "--registry"),
    (["https://user:pw@registry.example"], PEER, "--registry"),
    (["registry.example/some path"], PEER, "--registry"),
    (["docker.io"], "127.0.0.1:65001", "--peer"),
    (["docker.io"], "http://127.0.0.1:65001/v2", "--peer"),
    (["docker.io"], "http://127.0.0.1:99999", "--peer"),
])
def test_a_bad_value_names_its_option(registries: list[str], peer: str, option: str) -> None:
    with pytest.raises(containerd.BadOption, match=f"^{option}: "):
        containerd.plan(registries, peer)


# --- writing ----------------------------------------------------------------------------------

def test_write_is_idempotent_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "ghcr.io" / "hosts.toml"
    text = containerd.render("https://ghcr.io", PEER)
    assert containerd.write(path, text) is True
    assert path.read_text() == text
    assert path.stat().st_mode & 0o777 == 0o644
    before = path.stat()
    assert containerd.write(path, text) is False
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "untouched"
    # Different content replaces the file by a rename: a reader sees the old or the new one.
    other = containerd.render("https://ghcr.io", "http://127.0.0.1:65011")
    assert containerd.write(path, other) is True
    assert path.read_text() == other and path.stat().st_ino != before.st_ino
    assert [p.name for p in path.parent.iterdir()] == ["hosts.toml"], "no temporary left"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text("old")

    def full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        containerd.write(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["hosts.toml"]


# --- the command ------------------------------------------------------------------------------

def test_the_command_writes_then_leaves_untouched(tmp_path: Path) -> None:
    args = ["--dir", str(tmp_path), "--registry", "docker.io", "--registry", "ghcr.io"]
    first = _naiad(*args)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    lines = first.stdout.splitlines()
    assert len(lines) == 4 and all(line.endswith(": written") for line in lines)
    assert (tmp_path / "ghcr.io" / "hosts.toml").read_text() == \
        containerd.render("https://ghcr.io", containerd.DEFAULT_PEER)
    again = _naiad(*args)
    assert again.returncode == 0
    assert again.stdout.splitlines() == [line.replace("written", "unchanged") for line in lines]


@pytest.mark.parametrize(("args", "reason"), [
    (["--registry", "ghcr.io", "--dir", "{file}/certs.d"], "--dir {file}/certs.d: not a directory"),
    (["--registry", "ftp://ghcr.io", "--dir", "{tmp}"], "--registry: not an http(s) registry URL"),
    (["--registry", "ghcr.io", "--peer", "localhost", "--dir", "{tmp}"], "--peer: expected"),
    (["--dir", "{tmp}"], "--registry: give at least one registry"),
])
def test_a_mistake_is_one_line_and_status_2(tmp_path: Path, args: list[str],
                                            reason: str) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    names = {"file": str(file), "tmp": str(tmp_path / "certs.d")}
    out = _naiad(*(a.format(**names) for a in args))
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.startswith(f"naiad containerd-config: {reason.format(**names)}"), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert not (tmp_path / "certs.d").exists(), "nothing written on a mistake"
