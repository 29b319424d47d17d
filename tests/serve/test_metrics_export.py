"""Metrics as production scrapes them: from Ray's metrics agent, which every Serve replica
(ingress, scheduler, engines) reports to. After the ops relabelling (``ray_zimage_*`` →
``zimage_*``), the names the alert rules and the dashboard read are really there."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from opsfiles import names_used_by_ops

#: Only measured when something goes wrong, or pushed by the audit CronJob (not by Serve).
NOT_ON_THE_HAPPY_PATH = {
    "zimage_rejections_total",
    "zimage_s3_errors_total",
    "zimage_db_errors_total",
    "zimage_webhook_deliveries_total",
    "zimage_billing_audit_findings",
    "zimage_billing_audit_last_run_timestamp_seconds",
}


def scrape(url: str) -> dict[str, set[str]]:
    """Sample names by family, relabelled the way ops/prometheus/prometheus.yml does it."""
    text = httpx.get(url, timeout=10).text
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("ray_zimage_"):
            name = family.name.removeprefix("ray_")
            families[name] = {s.name.removeprefix("ray_") for s in family.samples}
    return families


def test_ray_exports_every_metric_the_rules_and_dashboard_read(serve_app, serve_keys, ray_metrics_port):
    answer = httpx.post(
        f"{serve_app}/v1/images/generations",
        json={"prompt": "measured through Ray", "size": "64x64", "steps": 2},
        headers={"Authorization": f"Bearer {serve_keys['acme']}"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    expected = names_used_by_ops() - NOT_ON_THE_HAPPY_PATH
    url = f"http://127.0.0.1:{ray_metrics_port}/metrics"
    deadline = time.monotonic() + 90
    while True:
        families = scrape(url)
        exported = {name for samples in families.values() for name in samples}
        missing = {
            name
            for name in expected
            if name not in exported and f"{name}_bucket" not in exported and f"{name}_total" not in exported
        }
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"not exported by Ray: {sorted(missing)}; exported: {sorted(exported)}"
