"""The shipped Prometheus rules and Grafana dashboard: valid, tested, and about metrics we have.

A renamed metric in agent/metrics.py or hub/telemetry.py without the rules and dashboard
following fails here, instead of silently never alerting.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from modelfleet.agent.metrics import AgentMetrics
from modelfleet.hub.telemetry import FleetCollector, TelemetryStore

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "modelfleet-rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "modelfleet-rules.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "modelfleet.json"
METRIC = re.compile(r"\bmodelfleet_[a-z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install the Debian package prometheus (`make sysdeps`)"
    return path


def exposed_names(tmp_path: Path) -> set[str]:
    """Every sample name the agent's and the hub's /metrics can expose."""
    families = list(AgentMetrics().registry.collect())
    store = TelemetryStore(tmp_path / "t.duckdb")
    try:
        families += list(FleetCollector(store).collect())
    finally:
        store.close()
    names = set()
    for f in families:
        names.update(f.name + s for s in SUFFIXES[f.type])
    return names


def _dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("definition")]
    return exprs


@pytest.mark.process
def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    promtool = _promtool()
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def test_the_rules_query_only_metrics_we_expose(tmp_path: Path) -> None:
    names = exposed_names(tmp_path)
    used = set(METRIC.findall(RULES.read_text()))
    assert used, "no modelfleet metric in the rules?"
    assert used <= names, f"rules query metrics nobody exposes: {sorted(used - names)}"
    # The product defaults, the same as the hub's built-in alert rules.
    text = RULES.read_text()
    assert ") > 0.1\n" in text and ") > 0.01\n" in text


def test_the_dashboard_parses_and_queries_only_metrics_we_expose(tmp_path: Path) -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "modelfleet"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            # The data source is chosen on import, not hard-wired to one installation.
            assert p["datasource"]["uid"] == "${datasource}"
    names = exposed_names(tmp_path)
    used = {m for e in _dashboard_exprs() for m in METRIC.findall(e)}
    assert used <= names, f"the dashboard queries metrics nobody exposes: {sorted(used - names)}"
    # Every metric we expose has a panel, so a new metric gets one too.
    families = {n for n in names if not n.endswith("_created")}
    shown = {n for n in families if any(u == n or n.startswith(u) for u in used)}
    bases = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in families - shown}
    covered = {re.sub(r"_(bucket|sum|count|total)$", "", u) for u in used}
    assert bases <= covered, f"metrics without a panel: {sorted(bases - covered)}"
