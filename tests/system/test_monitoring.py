"""deploy/monitoring: generated files fresh, both rule files identical, promtool's unit tests of
every alert, SLO thresholds on bucket boundaries, and a well-formed Grafana dashboard."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from ml_serving.api.metrics import RPC_BUCKETS
from scripts import gen_monitoring
from tests.support import REPO, monitoring

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool: make system-deps")


def test_generated_files_are_fresh() -> None:
    for name, text in gen_monitoring.outputs().items():
        committed = (monitoring.MONITORING / name).read_text(encoding="utf-8")
        assert committed == text, f"{name} is stale: run python -m scripts.gen_monitoring"


def test_the_prometheus_rule_carries_the_plain_groups() -> None:
    rule = monitoring.load_yaml(monitoring.OPERATOR_RULE)
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == monitoring.rule_groups()


def test_every_alert_has_severity_summary_and_description() -> None:
    names = [alert["alert"] for alert in monitoring.alerts()]
    assert len(names) == len(set(names))
    for alert in monitoring.alerts():
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        assert alert["annotations"]["summary"].strip(), alert["alert"]
        assert len(alert["annotations"]["description"]) > 80, alert["alert"]


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for case in monitoring.load_yaml(monitoring.RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    names = {alert["alert"] for alert in monitoring.alerts()}
    assert names - fired == set(), "alerts no test fires"
    assert names - silent == set(), "alerts no test keeps silent"


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "test", "rules", str(monitoring.RULES_TEST)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "rules", str(monitoring.PLAIN_RULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_thresholds_are_bucket_boundaries() -> None:
    # A threshold between two boundaries would be interpolated, not counted.
    used: set[float] = set()
    for expr in [rule["expr"] for rule in monitoring.rules()] + monitoring.dashboard_queries():
        used.update(float(v) for v in re.findall(r'le="([0-9.]+)"', expr))
    assert 0.05 in used, "Score's 50 ms SLO reads the 0.05 bucket"
    virtualservice = yaml.safe_load(
        (REPO / "deploy" / "base" / "istio-virtualservice.yaml").read_text(encoding="utf-8")
    )
    for route in virtualservice["spec"]["http"]:
        used.add(float(route["timeout"].removesuffix("s")))
    assert used <= {float(b) for b in RPC_BUCKETS}


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = monitoring.dashboard()
    assert board["schemaVersion"] >= 39
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["description"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], panel["title"]
    rows = {panel["title"] for panel in board["panels"] if panel["type"] == "row"}
    assert {"Score", "Generate", "LLM routes", "Experiments", "Models"} <= rows
