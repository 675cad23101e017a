from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, CountingProxy, Registry


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _wait_sync(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(url)
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def user_config(tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config directory of this test's own: the per-user cluster secret the daemons it starts
    generate and share (common/auth.py) lands there, never in the real home, and each test's
    cluster has a secret of its own. Spawned daemons inherit it through the environment."""
    config = tmp_path_factory.mktemp("config")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    for name in ("NAIAD_CLUSTER_SECRET", "NAIAD_CLUSTER_SECRET_FILE", "NAIAD_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    return config


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One real docker-registry for the session; tests use their own repositories."""
    reg = Registry(tmp_path_factory.mktemp("registry"))
    try:
        _wait_sync(f"{reg.url}/v2/")
    except TimeoutError:
        reg.stop()
        raise RuntimeError(f"docker-registry did not start:\n{reg.proc.logs()}") from None
    yield reg
    reg.stop()


@pytest.fixture
async def origin(registry: Registry) -> AsyncIterator[CountingProxy]:
    """The registry behind a byte counter: what each test's pulls cost the origin."""
    proxy = CountingProxy(registry.port)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(c.logs())


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name of this test's own."""
    name = request.node.name.lower()
    clean = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")
    while "--" in clean:
        clean = clean.replace("--", "-")
    return f"test/{clean[:60].strip('-')}-{os.getpid()}"
