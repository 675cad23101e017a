"""Which upstream registry a mirror request is for, and whether the peer may reach it.

Pure: the order is the `X-Dragonfly-Registry` header, containerd's `?ns=`, the host of an
absolute-form proxy target, then the peer's default registry. A bare host takes its scheme from
its allow-list entry (so `--allow-registry http://127.0.0.1:5000` makes it plain http);
registries and allow-lists themselves live in common/registries.py (the scheduler's preheat
uses them too).
"""

from __future__ import annotations

from common.registries import (  # noqa: F401 - the names peers import from here
    DOCKER_HUB,
    AllowList,
    Registry,
    UpstreamRefused,
    normalize_host,
)


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
