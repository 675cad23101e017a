"""containerd's mirror configuration, for `naiad containerd-config`: one
`<dir>/<registry>/hosts.toml` per registry, sending containerd's pulls to the node's peer first
and to the registry itself (`server`) when the peer does not answer.

`plan` is pure (which files, what text); `write` is the one edge: atomic, and a file that
already says the same is left untouched, so an init container can run it on every start.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from common.registries import DOCKER_HUB, DOCKER_HUB_ALIASES, Registry, UpstreamRefused

DEFAULT_DIR = "/etc/containerd/certs.d"
DEFAULT_PEER = "http://127.0.0.1:65001"  # the peer's --listen on the node (hostNetwork)
FILE = "hosts.toml"


class BadOption(ValueError):
    """A value the user gave that no file can be written for: the message names the option."""


def peer_url(text: str) -> str:
    """The peer's mirror address as containerd's `[host."…"]` wants it: http(s)://host:port,
    nothing after it (containerd appends `/v2/…` itself)."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise BadOption(f"--peer: not a URL: {text!r} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise BadOption(f"--peer: expected http(s)://HOST:PORT of the node's peer, got {text!r}")
    return f"{parts.scheme}://{parts.netloc}"


def render(server: str, peer: str) -> str:
    """The text of one hosts.toml: the peer first for pulls and resolves (it passes manifests
    by tag to the registry and serves blobs peer-to-peer), the registry as `server` for
    anything else and whenever the peer fails."""
    return (f'# Written by `naiad containerd-config`: pulls go to the naiad peer first.\n'
            f'server = "{server}"\n'
            f'\n'
            f'[host."{peer}"]\n'
            f'  capabilities = ["pull", "resolve"]\n')


def plan(registries: list[str], peer: str) -> dict[str, str]:
    """Directory name (the registry host as image references name it) -> hosts.toml text.
    A registry is `host[:port]` (https) or `http(s)://host[:port]`; Docker Hub, by any of its
    names, gets a directory for each of them, all with `server` registry-1.docker.io."""
    if not registries:
        raise BadOption("--registry: give at least one registry")
    mirror = peer_url(peer)
    out: dict[str, str] = {}
    for given in registries:
        try:
            registry = Registry.parse(given)
        except UpstreamRefused as e:
            raise BadOption(f"--registry: {e}") from None
        if urlsplit(given if "://" in given else f"//{given}").path.strip("/"):
            # containerd picks hosts.toml by registry host only: no per-repository mirrors.
            raise BadOption(f"--registry: a registry is host[:port], without a path: {given!r}")
        hosts = DOCKER_HUB_ALIASES if registry.host == DOCKER_HUB else (registry.host,)
        for host in hosts:
            out[host] = render(registry.base, mirror)
    return out


def write(path: Path, text: str) -> bool:
    """`text` at `path`, atomically (a temporary file beside it, renamed over it, so containerd
    never reads half a file); False, touching nothing, when it already says exactly that."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a non-root reader
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True
