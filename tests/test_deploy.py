"""docker-compose.yml is valid and runs what the code really accepts: every naiad command in it
parses with the real CLI, ports and volumes line up with the options, the peers know every
scheduler replica, and Prometheus scrapes exactly the services the file starts."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from naiad import cli
from tests.deploy import parse_naiad

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed (.ci/run installs it)"
    out = subprocess.run([binary, "config"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "NAIAD_CLUSTER_SECRET": "s3cret",
                              "NAIAD_TOKEN": "t0ken"})
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def naiad_services(compose: dict) -> dict[str, tuple[str, dict[str, Any]]]:
    """service name -> (command, resolved options), through the real CLI parser."""
    return {name: parse_naiad(svc["command"], svc.get("environment", {}))
            for name, svc in compose["services"].items()
            if svc.get("image", "").startswith("naiad")}


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def _mounts(svc: dict) -> dict[str, str]:
    """container path -> source (a named volume or a host path)."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            source, target = v.split(":")[:2]
            out[target] = source
    return out


@pytest.mark.parametrize("needed", ["NAIAD_CLUSTER_SECRET", "NAIAD_TOKEN"])
def test_compose_requires_the_cluster_secret_and_token(needed: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != needed}
    env.update({k: "x" for k in ("NAIAD_CLUSTER_SECRET", "NAIAD_TOKEN") if k != needed})
    out = subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert out.returncode != 0 and needed in out.stderr


def test_every_naiad_service_parses_with_the_real_cli(
        compose: dict, naiad_services: dict[str, tuple[str, dict[str, Any]]]) -> None:
    assert {"scheduler", "scheduler2", "peer1", "peer2", "peer3"} <= naiad_services.keys()
    for name, (command, opts) in naiad_services.items():
        svc = compose["services"][name]
        # parse_naiad has run the start-up checks: each service would start.
        assert cli._secret(opts) == b"s3cret"
        if command == "scheduler":
            assert opts["token"] == "t0ken"
            assert opts["allow_registry"], f"{name}: preheat needs the registry allow-listed"
        published = {int(p["target"]) for p in svc.get("ports", [])}
        assert _port(opts["listen"]) in published, name
        if command == "peer":
            assert _mounts(svc).get(opts["data_dir"]) == f"{name}-data", \
                f"{name}: its store must be on a volume of its own"
            assert opts["advertise"].split(":")[0] == name, "peers dial each other by name"


def test_schedulers_are_replicas_over_one_redis(
        compose: dict, naiad_services: dict[str, tuple[str, dict[str, Any]]]) -> None:
    schedulers = {n: o for n, (c, o) in naiad_services.items() if c == "scheduler"}
    assert len(schedulers) >= 2, "two scheduler replicas"
    assert compose["services"]["redis"]["image"].startswith("redis:7")
    urls = {o["redis"] for o in schedulers.values()}
    assert len(urls) == 1, f"replicas must share one Redis: {urls}"
    url = urls.pop()
    assert url.startswith("redis://redis:6379"), url
    for name in schedulers:
        assert "redis" in compose["services"][name].get("depends_on", {}), name
    published = [int(p["published"]) for s in schedulers
                 for p in compose["services"][s]["ports"]]
    assert len(published) == len(set(published)), "each replica on a host port of its own"


def test_peers_know_every_scheduler_and_one_is_a_seed(
        compose: dict, naiad_services: dict[str, tuple[str, dict[str, Any]]]) -> None:
    schedulers = [f"http://{n}:{_port(o['listen'])}"
                  for n, (c, o) in naiad_services.items() if c == "scheduler"]
    peers = {n: o for n, (c, o) in naiad_services.items() if c == "peer"}
    assert len(peers) >= 3
    for name, opts in peers.items():
        assert sorted(opts["scheduler"]) == sorted(schedulers), name
        assert opts["scheduler"][0] == "http://scheduler:8002", f"{name}: the first replica first"
    assert [n for n, o in peers.items() if o["seed"]] == ["peer1"]


def test_prometheus_scrapes_every_naiad_service(
        compose: dict, naiad_services: dict[str, tuple[str, dict[str, Any]]]) -> None:
    prom = compose["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus")
    mounts = _mounts(prom)
    config_in_container = "/etc/prometheus/prometheus.yml"
    assert Path(mounts[config_in_container]).resolve() == PROMETHEUS_CONFIG
    assert f"--config.file={config_in_container}" in prom["command"]

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        assert job.get("scheme", "http") == "http", job["job_name"]
        for static in job["static_configs"]:
            targets.setdefault(job["job_name"], set()).update(static["targets"])
    # Schedulers serve /metrics on their API port, peers on their mirror port (--listen).
    expected: dict[str, set[str]] = {}
    for name, (command, opts) in naiad_services.items():
        expected.setdefault(command, set()).add(f"{name}:{_port(opts['listen'])}")
    assert targets == {"naiad-scheduler": expected["scheduler"], "naiad-peer": expected["peer"]}
    depends = set(prom.get("depends_on", {}))
    assert set(naiad_services) <= depends


def test_prometheus_config_is_valid_for_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (.ci/run installs prometheus, which has it)"
    out = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_builds_the_packages_the_cli_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("common", "scheduler", "peer", "naiad"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["naiad"]' in dockerfile
