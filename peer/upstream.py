"""Which upstream registry a mirror request is for, and whether the peer may reach it.

Pure: the order is the `X-Dragonfly-Registry` header, containerd's `?ns=`, the host of an
absolute-form proxy target, then the peer's default registry. A bare host takes its scheme from
its allow-list entry (so `--allow-registry http://127.0.0.1:5000` makes it plain http).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

DOCKER_HUB = "registry-1.docker.io"
_DOCKER_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]{1,253}(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


class UpstreamRefused(ValueError):
    """The request names a registry this peer must not reach."""


def normalize_host(host: str) -> str:
    host = host.strip().lower().rstrip("/").removesuffix(":443")
    return DOCKER_HUB if host in _DOCKER_ALIASES else host


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
    """The registries reachable through this peer, by host, each with its scheme."""

    def __init__(self, registries: list[Registry]) -> None:
        self._scheme = {r.host: r.scheme for r in registries}

    def __contains__(self, host: str) -> bool:
        return normalize_host(host) in self._scheme

    def registry_for_host(self, host: str) -> Registry:
        host = normalize_host(host)
        if not _HOST_RE.match(host):
            raise UpstreamRefused(f"invalid registry host {host[:200]!r}")
        if host not in self._scheme:
            raise UpstreamRefused(f"registry {host} is not on this peer's allow-list")
        return Registry(self._scheme[host], host)

    def check(self, registry: Registry) -> Registry:
        if registry.host not in self._scheme:
            raise UpstreamRefused(f"registry {registry.host} is not on this peer's allow-list")
        return registry

    @property
    def hosts(self) -> list[str]:
        return sorted(self._scheme)


def choose_upstream(*, header: str | None, ns: str | None, proxy_host: str | None,
                    default: Registry, allow: AllowList) -> Registry:
    if header:
        # The allow-list entry says how to reach a registry, whatever scheme the header names:
        # a client cannot downgrade an https registry (and its credentials) to plain http.
        return allow.registry_for_host(Registry.parse(header).host)
    if ns:
        return allow.registry_for_host(ns)
    if proxy_host:
        return allow.registry_for_host(proxy_host)
    return default
