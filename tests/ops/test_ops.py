"""ops/: alert rules and their unit tests pass promtool, the dashboard and rules use only
documented metrics, every alert has a runbook, and the metric table matches the code."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from opsfiles import DASHBOARD, OPS, RULES, base_name, dashboard_exprs, documented_metrics, names_in, rules
from tools import tool
from zimage_platform.telemetry.metrics import PlatformMetrics, _Metric


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120)


def code_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    registry = PlatformMetrics("prometheus")
    found = {}
    for metric in vars(registry).values():
        if isinstance(metric, _Metric):
            found[metric._m._name + ("_total" if metric.kind == "counter" else "")] = (metric.kind, metric.labels)
    return found


def test_rules_pass_promtool_check_and_their_unit_tests():
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "zimage-platform.tests.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_refuses_a_broken_rule(tmp_path):
    """The check above can fail: a rule with a PromQL syntax error is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "sum by (pool"}]}]}))
    result = subprocess.run([tool("promtool"), "check", "rules", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0


def test_every_metric_in_code_is_documented_with_its_type_and_labels():
    assert code_metrics() == documented_metrics()


def test_rules_and_panels_use_only_documented_metrics_and_recorded_series():
    documented = documented_metrics()
    histograms = {name for name, (kind, _) in documented.items() if kind == "histogram"}
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    used = {base_name(name, histograms) for expr in exprs for name in names_in(expr)}
    assert used - set(documented) - recorded == set()
    # and the dashboard shows every metric, directly or through a recorded series
    recording = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    panel_names = {name for expr in dashboard_exprs() for name in names_in(expr)}
    panel_names |= {n for name in panel_names if name in recording for n in names_in(recording[name])}
    shown = {base_name(name, histograms) for name in panel_names}
    missing = set(documented) - shown - {"zimage_billing_audit_last_run_timestamp_seconds"}
    assert missing == set()


def test_every_alert_has_a_runbook_and_is_listed():
    listed = set(re.findall(r"^\| `(ZImage\w+)` \|", (OPS / "metrics.md").read_text(), re.M))
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {a["alert"] for a in alerts} == listed
    for alert in alerts:
        runbook = OPS.parent / alert["annotations"]["runbook"]
        assert runbook.is_file(), alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "tenant", "pool", "variant"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"}
                assert used <= variables, (panel["title"], used)


@pytest.mark.parametrize("name", sorted(documented_metrics()))
def test_metric_names_follow_prometheus_conventions(name: str):
    kind, labels = documented_metrics()[name]
    assert name.endswith("_total") == (kind == "counter")
    assert not {"job_id", "prompt", "image_key", "batch_id"} & set(labels)
