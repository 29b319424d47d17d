"""Traces: the full span tree of a batched request (in-memory exporter), and the OTLP/HTTP wire path
to a local receiver that decodes the protobuf payload."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zimage_platform.config import TelemetryConfig
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import (
    PlatformTracerProvider,
    configure_tracing,
    context_of,
    exporter_for,
    instrument_engine,
)


@pytest.fixture
def spans(platform):
    exporter = InMemorySpanExporter()
    provider = configure_tracing(platform.config.telemetry, "test")
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    # The provider is process-wide and cannot drop a processor: stop the exporter instead (it
    # then ignores spans quietly), not the processor (which would warn on every later span).
    exporter.shutdown()


def hexid(value: int, width: int = 32) -> str:
    return format(value, f"0{width}x")


async def test_a_batched_request_has_the_full_span_tree(client: httpx.AsyncClient, spans):
    blocker = await client.post("/v1/jobs", json={"prompt": "blocker", "size": "128x128", "steps": 8})
    first, second = await asyncio.gather(
        client.post("/v1/jobs", json={"prompt": "one", "size": "64x64", "steps": 3}),
        client.post("/v1/jobs", json={"prompt": "two", "size": "64x64", "steps": 3}),
    )
    async with asyncio.timeout(60):
        for job in (blocker, first, second):
            while (await client.get(f"/v1/jobs/{job.json()['id']}")).json()["status"] != "succeeded":
                await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    finished = spans.get_finished_spans()
    traces = {first.headers["x-trace-id"], second.headers["x-trace-id"]}
    assert {first.json()["trace_id"], second.json()["trace_id"]} == traces

    for trace_id in traces:
        names = {s.name for s in finished if hexid(s.context.trace_id) == trace_id}
        assert {"auth", "rate_limit", "admission", "queue_wait"} <= names, names
        assert any(n.startswith("POST /v1/jobs") for n in names), names

    batches = [
        s for s in finished if s.name == "batch" and {hexid(link.context.trace_id) for link in s.links} == traces
    ]
    assert len(batches) == 1, "the two requests were merged into one batch, linked to both"
    batch = batches[0]
    assert batch.attributes["zimage.batch.size"] == 2 and batch.attributes["zimage.steps"] == 3
    in_batch = [s for s in finished if s.context.trace_id == batch.context.trace_id]
    by_name = {s.name: s for s in in_batch}
    engine = by_name["engine"]
    assert engine.parent.span_id == batch.context.span_id
    for stage in ("text_encode", "denoise", "decode", "png_encode"):
        assert by_name[stage].parent.span_id == engine.context.span_id, stage
    assert by_name["denoise"].attributes["zimage.steps"] == 3
    s3_puts = [s for s in in_batch if s.name.startswith("S3.") and "PutObject" in s.name]
    assert len(s3_puts) == 2 and all(s.parent.span_id == engine.context.span_id for s in s3_puts)
    ledger = [s for s in in_batch if s.name == "ledger_write"]  # one write (transaction) per batch
    assert len(ledger) == 1 and ledger[0].parent.span_id == batch.context.span_id
    assert ledger[0].attributes["images"] == 2
    ledger_ids = {s.context.span_id for s in ledger}
    sql = [s for s in in_batch if s.parent is not None and s.parent.span_id in ledger_ids]
    inserts = [s for s in sql if "INSERT INTO ledger_entries" in str(s.attributes.get("db.statement", ""))]
    assert len(inserts) == 2 and all(s.attributes["db.system"] == "sqlite" for s in inserts), [s.name for s in sql]


def test_spans_reach_an_otlp_http_receiver_as_protobuf():
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: Request) -> Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.body())
        received.append(message)
        return Response(status_code=200)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="error",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        config = TelemetryConfig(exporter="otlp-http", otlp_endpoint=f"http://127.0.0.1:{port}", environment="test")
        provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name, "zimage.component": "test"})
        )
        processor = BatchSpanProcessor(exporter_for(config))
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("t")
        with (
            tracer.start_as_current_span("batch", attributes={"zimage.batch.size": 3}),
            tracer.start_as_current_span("denoise"),
        ):
            pass
        processor.force_flush()
    finally:
        server.should_exit = True
        thread.join(timeout=5)
    spans = [s for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert sorted(s.name for s in spans) == ["batch", "denoise"]
    resource = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes}
    assert resource["service.name"] == "zimage-platform"
    child = next(s for s in spans if s.name == "denoise")
    parent = next(s for s in spans if s.name == "batch")
    assert child.parent_span_id == parent.span_id and child.trace_id == parent.trace_id


def test_every_database_engine_in_a_process_gets_statement_spans(tmp_path):
    """The SQLAlchemy instrumentor instruments once per process: engines made after the first
    (a second store, a reconnect, the next test) must still get their statement spans."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engines = [create_engine(f"sqlite:///{tmp_path / f'{n}.db'}") for n in range(3)]
    for engine in engines:
        instrument_engine(engine, provider)
    instrument_engine(engines[0], provider)  # twice on one engine: still one span per statement
    for engine in engines:
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
    statements = [s for s in exporter.get_finished_spans() if s.attributes.get("db.statement") == "SELECT 1"]
    assert len(statements) == 3


async def test_a_comfy_path_key_reaches_no_span_metric_or_log(client: httpx.AsyncClient, keys, spans, caplog):
    """``/comfy/<key>/`` is stripped before the server span opens: the key is in no span name,
    attribute or event, no metric label and no log line (a trace backend is not a key store)."""
    key = keys["acme"]
    secret_part = key.rsplit("_", 1)[-1]
    caplog.set_level("DEBUG")
    async with httpx.AsyncClient(transport=client._transport, base_url="http://platform") as bare:
        assert (await bare.get(f"/comfy/{key}/queue")).status_code == 200
        assert (await bare.get(f"/comfy/{key}/api/history", params={"max_items": 1})).status_code == 200
        assert (await bare.get(f"/comfy/{key}/no-such-route")).status_code == 404
        assert (await bare.get(f"/comfy/{key}")).status_code == 404
    await asyncio.sleep(0.1)
    finished = spans.get_finished_spans()
    server = [s for s in finished if s.kind.name == "SERVER"]
    assert server, [s.name for s in finished]
    texts = [s.name for s in finished]
    for s in finished:
        texts += [f"{k}={v}" for k, v in (s.attributes or {}).items()]
        texts += [f"{e.name} {dict(e.attributes or {})}" for e in s.events]
    texts += [r.getMessage() for r in caplog.records if r.name != "httpx"]  # not this test's own client
    texts.append(metrics().exposition().decode())
    leaked = [t for t in texts if secret_part in t]
    assert not leaked, leaked
    targets = {s.attributes.get("http.target") or s.attributes.get("url.path") for s in server}
    assert {"/queue", "/api/history"} <= targets, targets


def test_without_an_exporter_spans_carry_trace_ids_but_are_not_recorded():
    """``exporter: none``: trace ids still exist and propagate (callers, job rows, bills, S3
    metadata carry them), but no span is built for nobody; the first span processor turns
    recording on (tests and tools add theirs after start-up)."""
    provider = PlatformTracerProvider(resource=Resource.create({}))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as outer, tracer.start_as_current_span("child") as inner:
        assert not outer.is_recording() and not inner.is_recording()
        assert outer.get_span_context().is_valid
        assert inner.get_span_context().trace_id == outer.get_span_context().trace_id
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracer.start_as_current_span("request") as recorded:
        assert recorded.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["request"]


def test_sample_ratio_records_a_share_of_new_traces_and_follows_a_sampled_caller():
    exporter = InMemorySpanExporter()
    provider = PlatformTracerProvider(resource=Resource.create({}), sample_ratio=0.0)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("new trace") as span:
        assert not span.is_recording() and span.get_span_context().is_valid
    caller = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    with tracer.start_as_current_span("followed", context=context_of(caller)) as span:
        assert span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["followed"]
