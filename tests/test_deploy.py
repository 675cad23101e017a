"""docker-compose.yml is valid and runs what the code really accepts: every naiad command in it
parses with the real CLI, and ports and volumes line up with the options."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import resolve
from naiad import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed (.ci/run installs it)"
    out = subprocess.run([binary, "config"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "NAIAD_CLUSTER_SECRET": "s3cret"})
    return yaml.safe_load(out.stdout)


def test_compose_requires_the_cluster_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NAIAD_CLUSTER_SECRET"}
    out = subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert out.returncode != 0 and "NAIAD_CLUSTER_SECRET" in out.stderr


def test_every_naiad_service_parses_with_the_real_cli(compose: dict) -> None:
    naiad_services = {name: svc for name, svc in compose["services"].items()
                      if svc.get("image", "").startswith("naiad")}
    assert {"scheduler", "peer1", "peer2", "peer3"} <= naiad_services.keys()
    for name, svc in naiad_services.items():
        argv = svc["command"]
        args = cli.build_parser().parse_args(argv)
        options = cli.SCHEDULER_OPTIONS if args.command == "scheduler" else cli.PEER_OPTIONS
        opts = resolve(options, args, args.command, environ=svc.get("environment", {}))
        secret = cli._secret(opts)
        listens = [opts["listen"]] + ([opts["upload"]] if args.command == "peer" else [])
        cli._require_secret(opts, secret, *listens)  # raises if the stack would refuse to start
        published = {int(p["target"]) for p in svc.get("ports", [])}
        assert int(opts["listen"].rsplit(":", 1)[1]) in published, name
        if args.command == "peer":
            mounts = {v.split(":")[1] for v in svc.get("volumes", [])}
            assert opts["data_dir"] in mounts, f"{name}: its store must be on a volume"
            assert opts["advertise"].split(":")[0] == name, "peers dial each other by name"
            assert "http://scheduler:8002" in opts["scheduler"]


def test_image_builds_the_packages_the_cli_needs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("common", "scheduler", "peer", "naiad"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["naiad"]' in dockerfile
