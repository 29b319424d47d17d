"""Reading ops/ (metric table, rules, dashboard): shared by the ops checks and the Ray export test."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

OPS = Path(__file__).resolve().parents[1] / "ops"
RULES = OPS / "prometheus" / "zimage-platform.rules.yml"
DASHBOARD = OPS / "grafana" / "zimage-platform.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows = re.findall(r"^\| `(zimage_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \|", (OPS / "metrics.md").read_text(), re.M)
    return {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bzimage(?::[a-z0-9_]+)+\b|\bzimage_[a-z0-9_]+\b", expr))


def base_name(name: str, histograms: set[str]) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in histograms:
            return name[: -len(suffix)]
    return name


def names_used_by_ops() -> set[str]:
    """Exported metric names (histograms by their base name; not recorded series) that rules and
    panels read."""
    histograms = {name for name, (kind, _) in documented_metrics().items() if kind == "histogram"}
    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    return {base_name(name, histograms) for expr in exprs for name in names_in(expr) if ":" not in name}
