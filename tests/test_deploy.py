"""The shipped Prometheus rules and Grafana dashboard: valid, tested, and naming real metrics.

A rule or panel that names a metric the proxy does not export never fires and
never draws, silently; so every ``edgeproxy_*`` name in them is checked against
a real exposition.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeproxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "edgeproxy.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "edgeproxy.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "edgeproxy-dashboard.json"

# a metric name, not a recording rule (those have colons) nor a word inside one
METRIC_NAME = re.compile(r"(?<![:\w])edgeproxy_[a-z0-9_]+(?![:\w])")
FIVE_SIGNALS = ("active", "establishment", "message rate", "heartbeat", "lifetime")


def exported_samples() -> list:
    """Every sample of an exposition in which each family has at least one series."""
    metrics = Metrics()
    key = metrics.connection_opened("websocket", "*/", "app", "10.0.0.1:80")
    metrics.connection_closed(key, 400, 1006)
    metrics.connection_failed("websocket", "upstream_timeout")
    metrics.ping_rtt(0.01)
    metrics.request_done(200, 0.01)
    metrics.upstream_servers = lambda: [{"upstream": "app", "server": "10.0.0.1:80", "up": True}]
    families = text_string_to_metric_families(metrics.render().decode())
    return [sample for family in families for sample in family.samples]


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    return {sample.name for sample in exported_samples()}


def test_promtool_checks_and_unit_tests_the_rules(external_tool) -> None:
    promtool = external_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout  # two recording rules, four alerts
    tests = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=60
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


def test_promtool_accepts_the_exposition(external_tool) -> None:
    """`promtool check metrics` lints names, units and help text the way Prometheus expects."""
    promtool = external_tool("promtool", "prometheus")
    metrics = Metrics()
    metrics.connection_closed(metrics.connection_opened("websocket", "*/", "app", "10.0.0.1:80"), 3.0, 1000)
    lint = subprocess.run([promtool, "check", "metrics"], input=metrics.render(), capture_output=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout == lint.stderr == b""


def test_the_four_alerts_are_defined() -> None:
    alerts = re.findall(r"^\s*- alert: (\w+)", RULES.read_text(), re.M)
    assert alerts == [
        "EdgeproxyConnectionImbalance",
        "EdgeproxyConnectionEstablishmentSpike",
        "EdgeproxyMessagesStalled",
        "EdgeproxyConnectionLifetimeCeiling",
    ]
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == set(alerts)


def test_rules_name_only_exported_metrics_and_buckets(exported_names: set[str]) -> None:
    text = RULES.read_text()
    used = set(METRIC_NAME.findall(text))
    assert "edgeproxy_connection_duration_seconds_bucket" in used
    assert used <= exported_names, used - exported_names
    bounds = {s.labels["le"] for s in exported_samples() if s.name == "edgeproxy_connection_duration_seconds_bucket"}
    for le in re.findall(r'le="([^"]+)"', text):
        assert le in bounds, f'le="{le}" is not a bucket bound of edgeproxy_connection_duration_seconds'


def test_grafana_dashboard_shows_the_five_signals_from_exported_metrics(exported_names: set[str]) -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " | ".join(p["title"].lower() for p in panels)
    for signal in FIVE_SIGNALS:
        assert signal in titles, signal
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(exprs)
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    used |= set(METRIC_NAME.findall(json.dumps(doc["templating"])))
    assert used <= exported_names, used - exported_names
