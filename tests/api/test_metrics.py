"""Prometheus metrics of the in-process platform: names, labels, and no unbounded label values."""

from __future__ import annotations

import asyncio
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families


async def scrape(client: httpx.AsyncClient) -> dict[str, list]:
    text = (await client.get("/metrics")).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_requests_stages_queues_batches_and_bills_are_measured(client: httpx.AsyncClient):
    job = (await client.post("/v1/jobs", json={"prompt": "measured", "size": "64x64", "steps": 3, "n": 2})).json()
    await client.post("/v1/jobs", json={"prompt": "x", "size": "1000x1000"})
    async with asyncio.timeout(60):
        while (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] != "succeeded":
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    families = await scrape(client)
    http = families["zimage_http_requests"]
    assert (
        value(http, "zimage_http_requests_total", tenant="acme", endpoint="/v1/jobs", method="POST", status="202") >= 1
    )
    assert value(http, "zimage_http_requests_total", endpoint="/v1/jobs/{job_id}", method="GET") >= 1
    assert value(families["zimage_rejections"], "zimage_rejections_total", reason="unsupported_size") >= 1
    stages = families["zimage_stage_seconds"]
    for stage in ("text_encode", "denoise", "decode", "png_encode"):
        assert value(stages, "zimage_stage_seconds_count", stage=stage, variant="turbo", bucket="64x64") >= 1, stage
    assert value(families["zimage_batch_size"], "zimage_batch_size_count", pool="cpu", variant="turbo") >= 1
    assert value(families["zimage_queue_wait_seconds"], "zimage_queue_wait_seconds_count", pool="cpu") >= 2
    assert value(families["zimage_images"], "zimage_images_total", variant="turbo", bucket="64x64") >= 2
    assert value(families["zimage_ledger_rows"], "zimage_ledger_rows_total", variant="turbo") >= 2
    assert value(families["zimage_jobs"], "zimage_jobs_total", status="succeeded") >= 1
    latency = families["zimage_job_seconds"]
    assert value(latency, "zimage_job_seconds_count", priority_class="standard", status="succeeded") >= 1
    assert "zimage_queue_depth" in families and "zimage_engine_busy_ratio" in families
    assert value(families["zimage_engine_slots"], "zimage_engine_slots", pool="cpu", variant="turbo") == 1


async def test_label_values_are_bounded(client: httpx.AsyncClient):
    await client.get("/v1/jobs/job_0123456789abcdef0123456789abcdef")  # a 404 with an id in the path
    for samples in (await scrape(client)).values():
        for sample in samples:
            for key, label in sample.labels.items():
                assert not re.search(r"(job|batch)_[0-9a-f]{8,}", label), (sample.name, key, label)
                assert len(label) < 64, (sample.name, key, label)


async def test_a_database_outage_answers_503_and_is_counted():
    """Any SQLAlchemy DBAPI error (here a real one: a PostgreSQL port nobody listens on) is a 503
    with a reason the caller can act on, never an opaque 500."""
    from fastapi import FastAPI
    from sqlalchemy import create_engine, text

    from zimage_platform.api.errors import install_error_handlers
    from zimage_platform.telemetry.metrics import metrics

    app = FastAPI()
    install_error_handlers(app)
    dead = create_engine("postgresql+psycopg://nobody@127.0.0.1:9/none", connect_args={"connect_timeout": 2})

    @app.get("/admit")
    def admit() -> None:
        with dead.connect() as connection:
            connection.execute(text("select 1"))

    before = metrics().rejections._m.labels(reason="database_unavailable", status="503")._value.get()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        answer = await c.get("/admit")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["code"] == "database_unavailable"
    after = metrics().rejections._m.labels(reason="database_unavailable", status="503")._value.get()
    assert after == before + 1


def test_a_gauge_set_to_the_value_it_holds_is_not_set_again():
    """The scheduler publishes its gauges on every dispatch decision; most do not change (on
    Ray's metrics every value is recorded again: its exporter loses gauges that are not)."""
    from zimage_platform.telemetry.metrics import PlatformMetrics

    registry = PlatformMetrics("prometheus")
    gauge = registry.queue_depth
    calls: list[dict[str, str]] = []
    labels = gauge._m.labels
    gauge._m.labels = lambda **tags: (calls.append(tags), labels(**tags))[1]
    for depth in (3, 3, 3, 4, 4, 3):
        gauge.set(depth, pool="bulk", priority_class="bulk")
    gauge.set(3, pool="realtime", priority_class="realtime")
    assert len(calls) == 4
    assert registry.registry.get_sample_value("zimage_queue_depth", {"pool": "bulk", "priority_class": "bulk"}) == 3
