"""deploy/grafana/naiad.json only asks Prometheus for what naiad really exports: every metric and
label a panel's PromQL names is checked against the /metrics of a live scheduler and peer, every
expression is parsed by promtool, and cluster-wide values are never summed across replicas."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Cluster, Registry

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "naiad.json"
# Grafana's own variables, replaced by what Grafana would put there before PromQL is parsed.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
TARGET_LABELS = ("instance", "job")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def panels(items: list[dict]) -> Iterator[dict]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every target."""
    out = []
    for p in panels(dashboard["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((p["title"], expr))
    return out


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The metric names an expression selects, each with its label matchers (name -> value).

    Strings, range durations and grouping clauses are blanked first; what remains that is an
    identifier, not a function call and not a PromQL keyword, is a metric name.
    """
    matchers: dict[int, dict[str, str]] = {}

    def blank_matchers(m: re.Match) -> str:
        matchers[m.start()] = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', m.group(0)))
        return " " * len(m.group(0))

    code = re.sub(r"\{[^}]*\}", blank_matchers, expr)
    code = re.sub(r"\[[^\]]*\]", lambda m: " " * len(m.group(0)), code)
    code = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
                  lambda m: " " * len(m.group(0)), code)
    found = []
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", code):
        name, rest = m.group(0), code[m.end():].lstrip()
        if name.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        brace = m.end() + len(expr[m.end():]) - len(expr[m.end():].lstrip())
        found.append((name, matchers.get(brace, {})))
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture
async def exported(cluster: Cluster, registry: Registry) -> dict[str, dict[str, set[str]]]:
    """Every sample name a live scheduler and peer export, with each label's values."""
    sched = await cluster.scheduler()
    peer = await cluster.peer("grafana-peer", sched.url, registry.url)
    out: dict[str, dict[str, set[str]]] = {}
    async with aiohttp.ClientSession() as s:
        for url in (sched.url, peer.url):
            async with s.get(f"{url}/metrics") as r:
                assert r.status == 200
                text = await r.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = out.setdefault(sample.name, {})
                    for k, v in sample.labels.items():
                        labels.setdefault(k, set()).add(v)
    assert any(n.startswith("naiad_peer_") for n in out)
    assert any(n.startswith("naiad_cluster_") for n in out)
    return out


async def test_every_panel_names_only_exported_metrics_and_labels(
        dashboard: dict, exported: dict[str, dict[str, set[str]]]) -> None:
    exprs = expressions(dashboard)
    assert exprs, "the dashboard has no queries"
    for title, expr in exprs:
        named = selectors(expr)
        assert named, f"{title}: {expr} selects no metric"
        for name, matchers in named:
            assert name in exported, f"{title}: {name} is not exported by naiad ({expr})"
            for label, value in matchers.items():
                assert label in exported[name], f"{title}: {name} has no label {label}"
                assert value in exported[name][label], f"{title}: {name}{{{label}={value!r}}}"
        # Grouping labels: the series' own, or the ones Prometheus adds to every target.
        labels = set(TARGET_LABELS).union(*(exported[name] for name, _ in named))
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in clause.split(","))):
                assert label in labels, f"{title}: no series in {expr} has a label {label}"


def test_the_checker_catches_a_misspelt_metric() -> None:
    """The name extraction above is what the test relies on: it must see every selector."""
    assert selectors('histogram_quantile(0.99, sum by (le, source) '
                     '(rate(naiad_peer_piece_secs_bucket{source="peer"}[1m])))') == [
        ("naiad_peer_piece_secs_bucket", {"source": "peer"})]
    assert [n for n, _ in selectors("max(a_total) / on (x) group_left sum(b offset 5m)")] == [
        "a_total", "b"]


def test_every_expression_parses_with_promtool(dashboard: dict, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (.ci/run installs prometheus, which has it)"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"naiad:dashboard:{i}", "expr": expr}
        for i, (_, expr) in enumerate(expressions(dashboard))]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cluster_values_are_never_summed_across_replicas(dashboard: dict) -> None:
    """Every scheduler replica exports the same naiad_cluster_* values (DESIGN): max, not sum."""
    cluster_exprs = [(t, e) for t, e in expressions(dashboard) if "naiad_cluster_" in e]
    assert cluster_exprs
    for title, expr in cluster_exprs:
        assert not re.search(r"\b(sum|count)\b", expr), f"{title}: {expr}"
        assert re.search(r"\bmax\b", expr), f"{title}: aggregate replicas with max: {expr}"


def test_the_dashboard_shows_what_operators_asked_for(dashboard: dict) -> None:
    each = [e for _, e in expressions(dashboard)]
    exprs = " ".join(each)
    for needed in ("naiad_cluster_backbone_savings_ratio", "naiad_cluster_download_bytes_total",
                   "naiad_peer_download_bytes_total", "naiad_peer_served_bytes_total",
                   "naiad_peer_verify_failures_total", "naiad_scheduler_peers"):
        assert needed in exprs, needed
    for q in ("0.5", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},")
                   and "naiad_peer_piece_seconds_bucket" in e for e in each), f"piece p{q}"
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels(dashboard["panels"]):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
