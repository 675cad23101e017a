"""Registry URLs and allow-lists, shared by the peer (what a mirror request may reach) and the
scheduler (what preheat may reach).

A registry is `scheme://host[:port]` (a bare host is https); its host is normalised (lower
case, no `:443`, Docker Hub's aliases as one). An allow-list entry says how to reach its host:
a bare host looked up in it takes the entry's scheme, so `--allow-registry
http://127.0.0.1:5000` makes that registry plain http and nobody can downgrade an https one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

DOCKER_HUB = "registry-1.docker.io"
# The names image references give Docker Hub: one registry (containerd configures each).
DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


class UpstreamRefused(ValueError):
    """The request names a registry this daemon must not reach."""


def normalize_host(host: str) -> str:
    host = host.strip().lower().rstrip("/").removesuffix(":443")
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


@dataclass(frozen=True, slots=True)
class Registry:
    scheme: str
    host: str  # host[:port], normalised

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"

    @classmethod
    def parse(cls, url: str) -> Registry:
        if "://" not in url:
            url = "https://" + url
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - validates the port
        except ValueError as e:
            raise UpstreamRefused(f"invalid registry URL {url[:200]!r}: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UpstreamRefused(f"not an http(s) registry URL: {url[:200]!r}")
        if parts.username or parts.password or "@" in parts.netloc:
            raise UpstreamRefused("registry URL must not carry userinfo")
        if not _HOST_RE.match(parts.netloc):
            raise UpstreamRefused(f"invalid registry host {parts.netloc[:200]!r}")
        return cls(parts.scheme, normalize_host(parts.netloc))


class AllowList:
    """The registries a daemon may reach, by host, each with its scheme. `owner` names the
    daemon in refusals ("not on this peer's allow-list")."""

    def __init__(self, registries: list[Registry], owner: str = "peer") -> None:
        self._scheme = {r.host: r.scheme for r in registries}
        self.owner = owner

    def __contains__(self, host: str) -> bool:
        return normalize_host(host) in self._scheme

    def _refused(self, host: str) -> UpstreamRefused:
        return UpstreamRefused(f"registry {host} is not on this {self.owner}'s allow-list")

    def registry_for_host(self, host: str) -> Registry:
        host = normalize_host(host)
        if not _HOST_RE.match(host):
            raise UpstreamRefused(f"invalid registry host {host[:200]!r}")
        if host not in self._scheme:
            raise self._refused(host)
        return Registry(self._scheme[host], host)

    def check(self, registry: Registry) -> Registry:
        if registry.host not in self._scheme:
            raise self._refused(registry.host)
        return registry

    @property
    def hosts(self) -> list[str]:
        return sorted(self._scheme)
