"""Unit tests for peer/upstream.py: which registry a mirror/proxy request goes to, and refusals."""

from __future__ import annotations

import pytest

from peer.upstream import (
    DOCKER_HUB,
    AllowList,
    Registry,
    UpstreamRefused,
    choose_upstream,
    normalize_host,
)

HUB = Registry("https", "registry-1.docker.io")
GHCR = Registry("https", "ghcr.io")
LOCAL = Registry("http", "127.0.0.1:5000")
QUAY = Registry("https", "quay.io")
ALLOW = AllowList([HUB, GHCR, LOCAL, QUAY, Registry("http", "[::1]:5001")])


def choose(header: str | None = None, ns: str | None = None, proxy_host: str | None = None,
           default: Registry = HUB, allow: AllowList = ALLOW) -> Registry:
    return choose_upstream(header=header, ns=ns, proxy_host=proxy_host, default=default,
                           allow=allow)


# --- precedence -------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "ns", "proxy_host", "expected"), [
    (None, None, None, HUB),
    ("https://ghcr.io", None, None, GHCR),
    ("https://ghcr.io", "quay.io", "127.0.0.1:5000", GHCR),  # header beats all
    (None, "quay.io", "127.0.0.1:5000", QUAY),  # ns beats the proxy host
    (None, None, "127.0.0.1:5000", LOCAL),  # proxy host beats the default
    (None, None, "quay.io", QUAY),
    ("", "quay.io", None, QUAY),  # an empty header is no header
    ("", "", "ghcr.io", GHCR),
    ("", "", "", HUB),
])
def test_precedence(header: str | None, ns: str | None, proxy_host: str | None,
                    expected: Registry) -> None:
    assert choose(header, ns, proxy_host) == expected


def test_default_is_used_as_given() -> None:
    assert choose(default=GHCR) == GHCR
    assert choose(default=LOCAL).base == "http://127.0.0.1:5000"


# --- schemes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1:5000", "http://127.0.0.1:5000"),  # plain http from its allow-list entry
    ("ghcr.io", "https://ghcr.io"),
    ("GHCR.IO", "https://ghcr.io"),
    ("quay.io", "https://quay.io"),
    ("[::1]:5001", "http://[::1]:5001"),
    ("docker.io", "https://registry-1.docker.io"),
])
@pytest.mark.parametrize("where", ["ns", "proxy_host"])
def test_bare_host_takes_scheme_from_allow_list(host: str, expected: str, where: str) -> None:
    r = choose(**{where: host})
    assert r.base == expected


def test_header_keeps_its_own_scheme() -> None:
    assert choose(header="http://127.0.0.1:5000") == LOCAL
    assert choose(header="https://ghcr.io").base == "https://ghcr.io"


def test_header_without_scheme_is_https() -> None:
    assert choose(header="ghcr.io") == GHCR


def test_header_path_is_ignored() -> None:
    assert choose(header="https://ghcr.io/v2/") == GHCR


def test_header_host_is_normalised() -> None:
    assert choose(header="HTTPS://GHCR.io/") == GHCR


def test_allow_list_entry_scheme_wins_over_default_https_for_bare_host() -> None:
    allow = AllowList([Registry.parse("http://registry.internal:8080")])
    r = choose(ns="registry.internal:8080", allow=allow)
    assert r == Registry("http", "registry.internal:8080")


# --- docker hub aliases ----------------------------------------------------------------------

@pytest.mark.parametrize("alias", [
    "docker.io", "index.docker.io", "registry-1.docker.io", "Docker.IO",
    "docker.io:443", "index.docker.io:443", "registry-1.docker.io:443", "docker.io/",
])
def test_docker_hub_aliases_are_one_registry(alias: str) -> None:
    assert normalize_host(alias) == DOCKER_HUB
    assert alias in ALLOW
    assert choose(ns=alias) == HUB
    assert choose(proxy_host=alias) == HUB
    assert choose(header="https://" + alias.rstrip("/")) == HUB


@pytest.mark.parametrize("alias", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_allow_list_via_any_alias(alias: str) -> None:
    allow = AllowList([Registry.parse("https://" + alias)])
    assert allow.hosts == [DOCKER_HUB]
    for other in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert choose(ns=other, allow=allow, default=GHCR) == HUB


def test_default_https_port_is_the_bare_host_other_ports_are_kept() -> None:
    assert normalize_host("ghcr.io:443") == "ghcr.io"
    assert normalize_host("Example.COM:5000/") == "example.com:5000"


@pytest.mark.parametrize(("url", "expected"), [
    ("https://ghcr.io", GHCR),
    ("ghcr.io", GHCR),
    ("http://127.0.0.1:5000", LOCAL),
    ("http://127.0.0.1:5000/", LOCAL),
    ("https://docker.io", HUB),
    ("https://index.docker.io/v1/", HUB),
    ("http://[::1]:5001", Registry("http", "[::1]:5001")),
    ("HTTP://LOCALHOST:5000", Registry("http", "localhost:5000")),
])
def test_registry_parse(url: str, expected: Registry) -> None:
    assert Registry.parse(url) == expected


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"header": "https://evil.example.com"},
    {"header": "http://ghcr.io.evil.example.com"},
    {"header": "https://127.0.0.1:5001"},  # allowed host, other port
    {"ns": "evil.example.com"},
    {"ns": "127.0.0.1"},
    {"ns": "127.0.0.1:5001"},
    {"ns": "localhost:5000"},  # not the allow-listed 127.0.0.1:5000
    {"proxy_host": "evil.example.com"},
    {"proxy_host": "10.0.0.1:5000"},
    {"proxy_host": "ghcr.io:8443"},
])
def test_off_allow_list_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(UpstreamRefused):
        choose(**kwargs)


@pytest.mark.parametrize("header", [
    "https://user:pass@ghcr.io",
    "https://user@ghcr.io",
    "https://:pass@ghcr.io",
    "https://ghcr.io@evil.example.com",
    "https://evil.example.com@ghcr.io",
    "http://@127.0.0.1:5000",
])
def test_userinfo_refused(header: str) -> None:
    with pytest.raises(UpstreamRefused):
        choose(header=header)


@pytest.mark.parametrize("header", [
    "ftp://ghcr.io",
    "file:///etc/passwd",
    "gopher://ghcr.io",
    "ws://ghcr.io",
    "unix:///var/run/docker.sock",
    "javascript://ghcr.io",
    "https://",
    "http://",
    "//ghcr.io",
])
def test_non_http_schemes_refused(header: str) -> None:
    with pytest.raises(UpstreamRefused):
        choose(header=header)


GARBAGE_HOSTS = [
    "ghcr io",
    "ghcr.io/evil",
    "ghcr.io:5000:6000",
    "ghcr.io:",
    "ghcr.io:abc",
    "ghcr.io:123456",
    "gh_cr.io",
    "ghcr.io?x=1",
    "ghcr.io#x",
    "user@ghcr.io",
    "ghcr.io\\evil",
    "[::1",
    "::1:5000",
    "a" * 300,
    "ghcr.io%2Fevil",
    "héllo.io",
]


@pytest.mark.parametrize("host", GARBAGE_HOSTS)
@pytest.mark.parametrize("where", ["ns", "proxy_host"])
def test_garbage_hosts_refused(host: str, where: str) -> None:
    with pytest.raises(UpstreamRefused):
        choose(**{where: host})


# In a URL, a path, query or fragment after the host is not part of the host (see
# test_header_path_is_ignored), and an unbalanced bracket is covered below.
GARBAGE_HEADER_HOSTS = [h for h in GARBAGE_HOSTS
                        if not h.startswith(("ghcr.io/", "ghcr.io?", "ghcr.io#", "["))]


@pytest.mark.parametrize("host", GARBAGE_HEADER_HOSTS)
def test_garbage_header_refused(host: str) -> None:
    with pytest.raises(UpstreamRefused):
        choose(header="https://" + host)


@pytest.mark.parametrize("header", ["https://[::1", "https://ghcr.io]", "http://[::1:5000"])
def test_unbalanced_bracket_header_refused(header: str) -> None:
    # The mirror catches UpstreamRefused only (403); anything else is a 500 for a header any
    # client can send.
    with pytest.raises(UpstreamRefused):
        choose(header=header)


def test_garbage_host_refused_even_if_allow_list_is_permissive() -> None:
    # Refusal comes from the host syntax itself, not only from a failed lookup.
    with pytest.raises(UpstreamRefused, match="invalid"):
        ALLOW.registry_for_host("ghcr.io/evil")


def test_refused_is_a_value_error() -> None:
    assert issubclass(UpstreamRefused, ValueError)


def test_allow_list_membership_and_hosts() -> None:
    assert "ghcr.io" in ALLOW
    assert "GHCR.IO" in ALLOW
    assert "evil.example.com" not in ALLOW
    assert ALLOW.hosts == sorted(["registry-1.docker.io", "ghcr.io", "127.0.0.1:5000",
                                  "quay.io", "[::1]:5001"])
    assert ALLOW.check(GHCR) is GHCR
    with pytest.raises(UpstreamRefused):
        ALLOW.check(Registry("https", "evil.example.com"))


def test_empty_allow_list_refuses_everything_but_the_default() -> None:
    empty = AllowList([])
    assert choose(allow=empty, default=GHCR) == GHCR
    for kwargs in ({"header": "https://ghcr.io"}, {"ns": "ghcr.io"}, {"proxy_host": "ghcr.io"}):
        with pytest.raises(UpstreamRefused):
            choose(allow=empty, default=GHCR, **kwargs)


def test_header_takes_the_allow_list_scheme_so_https_is_never_downgraded() -> None:
    allow = AllowList([Registry("https", "ghcr.io"), Registry("http", "127.0.0.1:5000")])
    default = Registry("https", "ghcr.io")
    assert choose_upstream(header="http://ghcr.io", ns=None, proxy_host=None, default=default,
                           allow=allow) == Registry("https", "ghcr.io")
    assert choose_upstream(header="https://ghcr.io:443", ns=None, proxy_host=None,
                           default=default, allow=allow) == Registry("https", "ghcr.io")
    assert choose_upstream(header="https://127.0.0.1:5000", ns=None, proxy_host=None,
                           default=default, allow=allow) == Registry("http", "127.0.0.1:5000")
