"""deploy/kubernetes is a kustomize base that Kubernetes accepts and that runs what the code
really takes: built by `kubectl kustomize` (read by hand where kubectl is missing, and checked
equal to kubectl's build where it is not), validated against the Kubernetes schemas, every
naiad container's arguments parsed by the real CLI with the environment the kubelet gives it,
and the objects wired to each other (Services to ports, the Secret to every daemon, the init
container's hosts.toml to the node's peer)."""

from __future__ import annotations

import copy
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from common.registries import Registry
from naiad import cli
from tests.deploy import parse_naiad

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
DOCS = ROOT / "docs" / "kubernetes.md"
# The kubectl on these machines, and the newest schemas the validator ships.
VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
# What the kubelet puts in a container's environment, for a pod on a node `node-1`.
FIELDS = {"spec.nodeName": "node-1", "status.hostIP": "10.0.0.7", "status.podIP": "10.1.0.9"}
SECRETS = {("naiad", "cluster-secret"): "s3cret", ("naiad", "token"): "t0ken"}
LEAVE_SECONDS = 2.0  # after draining, the peer's leave call to the scheduler (scheduler_client)

Containers = list[tuple[str, dict[str, Any], str, dict[str, Any]]]


def _by_hand(base: Path) -> list[dict[str, Any]]:
    """The base as `kubectl kustomize` builds it, for machines without kubectl. It reads only
    `namespace` and `resources`: a kustomization using more fails here, not silently."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "namespace", "resources"}
    assert not unknown, f"tests/test_kubernetes.py cannot build {sorted(unknown)} by hand"
    out = []
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((base / resource).read_text()):
            if doc is None:
                continue
            if doc["kind"] != "Namespace" and "namespace" in kustomization:
                doc["metadata"]["namespace"] = kustomization["namespace"]
            out.append(doc)
    return out


def _keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(keyed) == len(docs), "two objects of one kind and name"
    return keyed


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict[str, Any]]:
    by_hand = _keyed(_by_hand(BASE))
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return by_hand
    out = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    built = _keyed([d for d in yaml.safe_load_all(out.stdout) if d is not None])
    assert built == by_hand, "the reading by hand (used without kubectl) differs from kubectl's"
    return built


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` in args and env values: a defined variable is replaced, `$$` is a
    `$`, anything else stays as written."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def _environ(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: literal values (expanded in order), a Secret's keys, the
    downward API's fields. A reference to a Secret or key the operator is not told to make
    raises KeyError."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = SECRETS[(ref["name"], ref["key"])]
        else:
            env[var["name"]] = FIELDS[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _pod(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def _workloads(objects: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for (kind, _), o in objects.items() if kind in ("Deployment", "DaemonSet")]


@pytest.fixture(scope="module")
def naiad_containers(objects: dict[tuple[str, str], dict[str, Any]]) -> Containers:
    """(workload name, container, command, options) of every naiad container, init containers
    included, through the real CLI."""
    out = []
    for obj in _workloads(objects):
        pod = _pod(obj)
        for c in pod.get("initContainers", []) + pod["containers"]:
            if not c["image"].startswith("naiad"):
                continue
            # The image's ENTRYPOINT is `naiad` (Dockerfile): only args, as compose's command.
            assert "command" not in c, f"{c['name']}: args only, the entrypoint is naiad"
            env = _environ(c)
            argv = [_expand(a, env) for a in c["args"]]
            assert not [a for a in argv if "$(" in a], f"{c['name']}: unexpanded {argv}"
            out.append((obj["metadata"]["name"], c, *parse_naiad(argv, env)))
    return out


def _one(containers: Containers, command: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (found,) = [(c, o) for _, c, cmd, o in containers if cmd == command]
    return found


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def _container_port(container: dict[str, Any], name_or_number: str | int) -> dict[str, Any]:
    (port,) = [p for p in container["ports"]
               if name_or_number in (p.get("name"), p["containerPort"])]
    return port


def _registry_hosts(opts: dict[str, Any]) -> set[str]:
    """The hosts an allow-list reaches: a peer's default --registry and every --allow-registry."""
    urls = opts["allow_registry"] + ([opts["registry"]] if "registry" in opts else [])
    return {Registry.parse(u).host for u in urls}


# --- the base as Kubernetes sees it -----------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_is_valid_for_kubernetes(
        objects: dict[tuple[str, str], dict[str, Any]], version: str) -> None:
    assert {("Deployment", "naiad-scheduler"), ("Service", "naiad-scheduler"),
            ("Deployment", "naiad-redis"), ("Service", "naiad-redis"),
            ("DaemonSet", "naiad-peer")} <= objects.keys()
    for (kind, name), obj in objects.items():
        try:  # strict: a misspelt or misplaced field is an error, not ignored
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{kind}/{name} against {version}: {e.message}") from None


def test_the_validator_refuses_a_misspelt_field(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The check above can fail: one typo a reader might make is caught."""
    bad = copy.deepcopy(objects[("DaemonSet", "naiad-peer")])
    _pod(bad)["hostNetwrok"] = _pod(bad).pop("hostNetwork")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


# --- what the containers run ------------------------------------------------------------------

def test_every_naiad_container_runs_what_the_cli_takes(naiad_containers: Containers) -> None:
    commands = sorted(cmd for _, _, cmd, _ in naiad_containers)
    assert commands == ["containerd-config", "peer", "scheduler"]
    assert len({c["image"] for _, c, _, _ in naiad_containers}) == 1, "one image for all"
    for _, c, _, _ in naiad_containers:
        assert c.get("imagePullPolicy") == "IfNotPresent", \
            f"{c['name']}: a locally built naiad:latest is never pulled"


def test_every_container_requests_resources(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for obj in _workloads(objects):
        pod = _pod(obj)
        for c in pod.get("initContainers", []) + pod["containers"]:
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= requests.keys(), f"{obj['metadata']['name']}/{c['name']}"


def test_daemons_take_the_secret_and_token_from_the_secret(
        naiad_containers: Containers) -> None:
    daemons = [(w, c, cmd, o) for w, c, cmd, o in naiad_containers
               if cmd in ("scheduler", "peer")]
    assert len(daemons) == 2
    for workload, c, command, opts in daemons:
        env = {v["name"]: v for v in c["env"]}
        wanted = {"NAIAD_CLUSTER_SECRET": "cluster-secret"}
        if command == "scheduler":
            wanted["NAIAD_TOKEN"] = "token"
        for name, key in wanted.items():
            assert env[name].get("valueFrom", {}).get("secretKeyRef") == \
                {"name": "naiad", "key": key}, f"{workload}: {name} from the Secret"
        # Resolved through the CLI's own precedence: flags, then NAIAD_*, then defaults.
        assert opts["cluster_secret"] == "s3cret" and not opts["insecure"], workload
        if command == "scheduler":
            assert opts["token"] == "t0ken"


def test_the_docs_make_the_secret_the_base_reads(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    """The Secret is the operator's (never a value in the repository): docs/kubernetes.md's
    command makes it, in the base's namespace, with every key the containers read."""
    assert not [k for k in objects if k[0] == "Secret"], "no secret values in the base"
    text = DOCS.read_text()
    (command,) = re.findall(r"^ *kubectl .*create secret generic.*$", text, re.MULTILINE)
    namespace = objects[("DaemonSet", "naiad-peer")]["metadata"]["namespace"]
    assert f"-n {namespace} " in command
    (name,) = re.findall(r"create secret generic (\S+)", command)
    keys = set(re.findall(r"--from-literal=([\w-]+)=", command))
    assert {(name, k) for k in keys} == set(SECRETS)


# --- the scheduler ----------------------------------------------------------------------------

def test_schedulers_are_two_replicas_over_the_redis_service(
        objects: dict[tuple[str, str], dict[str, Any]], naiad_containers: Containers) -> None:
    deployment = objects[("Deployment", "naiad-scheduler")]
    assert deployment["spec"]["replicas"] == 2
    _, opts = _one(naiad_containers, "scheduler")
    url = urlsplit(opts["redis"])
    redis = objects[("Service", url.hostname)]
    (port,) = redis["spec"]["ports"]
    assert port["port"] == url.port
    redis_pod = objects[("Deployment", url.hostname)]["spec"]["template"]
    assert redis["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()
    assert redis_pod["spec"]["containers"][0]["image"].startswith("redis:7")
    assert _container_port(redis_pod["spec"]["containers"][0],
                           port["targetPort"])["containerPort"] == 6379


def test_the_scheduler_service_reaches_the_api_and_the_heartbeat_port(
        objects: dict[tuple[str, str], dict[str, Any]], naiad_containers: Containers) -> None:
    container, opts = _one(naiad_containers, "scheduler")
    deployment = objects[("Deployment", "naiad-scheduler")]
    service = objects[("Service", "naiad-scheduler")]
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    listens = {"TCP": _port(opts["listen"]), "UDP": _port(opts["udp"])}
    assert {p["protocol"] for p in service["spec"]["ports"]} == set(listens)
    for p in service["spec"]["ports"]:
        target = _container_port(container, p["targetPort"])
        assert target["protocol"] == p["protocol"]
        assert target["containerPort"] == listens[p["protocol"]]
        # Peers send heartbeats to the port the scheduler listens on, at the Service's host.
        assert p["port"] == listens[p["protocol"]]
    assert not opts["udp_advertise"], "peers reach --udp's port at their --scheduler host"


def test_schedulers_are_ready_on_healthy_and_scraped(
        objects: dict[tuple[str, str], dict[str, Any]], naiad_containers: Containers) -> None:
    container, opts = _one(naiad_containers, "scheduler")
    _check_ready_and_scraped(objects[("Deployment", "naiad-scheduler")], container,
                             _port(opts["listen"]))
    assert opts["allow_registry"], "preheat needs registries allow-listed"


def _check_ready_and_scraped(workload: dict[str, Any], container: dict[str, Any],
                             port: int) -> None:
    """Readiness on `/healthy` and Prometheus' pod annotations, both on the daemon's
    `--listen` port (where /healthy and /metrics are served)."""
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthy"
    assert _container_port(container, probe["port"])["containerPort"] == port
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


# --- the peer on every node -------------------------------------------------------------------

def test_the_peer_runs_on_the_node_network_and_finds_the_scheduler(
        objects: dict[tuple[str, str], dict[str, Any]], naiad_containers: Containers) -> None:
    daemonset = objects[("DaemonSet", "naiad-peer")]
    pod = _pod(daemonset)
    assert pod["hostNetwork"] is True
    # On the node's network only this policy resolves Service names.
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    container, opts = _one(naiad_containers, "peer")
    _check_ready_and_scraped(daemonset, container, _port(opts["listen"]))
    service = objects[("Service", "naiad-scheduler")]
    (http,) = [p for p in service["spec"]["ports"] if p["protocol"] == "TCP"]
    assert opts["scheduler"] == [f"http://naiad-scheduler:{http['port']}"]
    # Other peers dial the node's address; the scheduler refuses a loopback one.
    assert opts["advertise"] == f"{FIELDS['status.hostIP']}:{_port(opts['upload'])}"
    assert opts["id"] == FIELDS["spec.nodeName"]
    for port in (opts["listen"], opts["upload"]):
        assert _container_port(container, _port(port))["protocol"] == "TCP"


def test_the_peer_keeps_its_store_on_the_node(
        objects: dict[tuple[str, str], dict[str, Any]], naiad_containers: Containers) -> None:
    pod = _pod(objects[("DaemonSet", "naiad-peer")])
    container, opts = _one(naiad_containers, "peer")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == opts["data_dir"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    assert opts["disk_quota"], "a bound on the node's disk"


def test_the_grace_period_outlasts_the_peers_drain(
        objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    grace = _pod(objects[("DaemonSet", "naiad-peer")])["terminationGracePeriodSeconds"]
    # SIGKILL must not cut the drain (in-flight pulls and uploads) nor the leave after it.
    assert grace >= cli.DRAIN_SECONDS[signal.SIGTERM] + LEAVE_SECONDS


def test_the_init_container_points_containerd_at_the_nodes_peer(
        objects: dict[tuple[str, str], dict[str, Any]], naiad_containers: Containers,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pod = _pod(objects[("DaemonSet", "naiad-peer")])
    init, args = _one(naiad_containers, "containerd-config")
    assert [c["name"] for c in pod["initContainers"]] == [init["name"]]
    # The directory it writes is containerd's on the node: the same path inside and out.
    (mount,) = [m for m in init["volumeMounts"] if m["mountPath"] == args["dir"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == args["dir"] == "/etc/containerd/certs.d"
    _, peer = _one(naiad_containers, "peer")
    assert args["peer"] == f"http://127.0.0.1:{_port(peer['listen'])}"
    # containerd may only be sent to the peer for registries the peer reaches, and preheat
    # should reach them too.
    wanted = {Registry.parse(r).host for r in args["registry"]}
    assert wanted <= _registry_hosts(peer)
    _, scheduler = _one(naiad_containers, "scheduler")
    assert wanted <= _registry_hosts(scheduler)
    # And it runs: one hosts.toml per registry name, Docker Hub's aliases included.
    argv = [a if a != args["dir"] else str(tmp_path) for a in init["args"]]
    assert cli.main(argv) == 0
    written = sorted(p.parent.name for p in tmp_path.glob("*/hosts.toml"))
    assert {"docker.io", "index.docker.io", "registry-1.docker.io"} <= set(written)
    assert capsys.readouterr().out.count(": written") == len(written)
