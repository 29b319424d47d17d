"""OpenTelemetry tracing: one provider per process, exporters chosen by config, context carried
in the requests themselves (a job's ``traceparent``, a batch's) across Ray handle calls.

Spans: the HTTP request (FastAPI instrumentation), auth, rate limit, admission, queue wait per
image, the batch (linked to every member request's span), the engine stages (text encode,
denoise with its step count, decode, PNG), S3 calls (botocore instrumentation), the ledger
write and webhook deliveries.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, SamplingResult, TraceIdRatioBased

from zimage_platform import __version__

if TYPE_CHECKING:
    from zimage_platform.config import TelemetryConfig

log = logging.getLogger(__name__)
TRACER_NAME = "zimage_platform"
SQL_INSTRUMENTATION = "opentelemetry.instrumentation.sqlalchemy"
_lock = threading.Lock()
_configured: dict[str, Any] = {}


def exporter_for(config: TelemetryConfig) -> SpanExporter | None:
    if config.exporter == "otlp-http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = config.otlp_endpoint.rstrip("/") + "/v1/traces" if config.otlp_endpoint else None
        return OTLPSpanExporter(endpoint=endpoint, headers=dict(config.otlp_headers))
    if config.exporter == "otlp-grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=config.otlp_endpoint, headers=tuple(config.otlp_headers.items()), insecure=True)
    if config.exporter == "console":
        return ConsoleSpanExporter()
    return None


class _WhileExporting(Sampler):
    """Records spans only once the provider has a processor to hand them to. With ``exporter:
    none`` every span is still started, so trace ids exist (returned to callers, stored with jobs,
    bills and objects) and travel on, but none is recorded: no attributes, events or statement
    spans are built for nobody (on the scheduler that was a tenth of its CPU under load)."""

    def __init__(self, delegate: Sampler) -> None:
        self.delegate = delegate
        self.exporting = False

    def should_sample(
        self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
    ) -> SamplingResult:
        chosen = self.delegate if self.exporting else ALWAYS_OFF
        return chosen.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"WhileExporting{{{self.delegate.get_description()}}}"


class PlatformTracerProvider(TracerProvider):
    """A provider whose spans are recorded from its first span processor on (tests and tools
    may add one later, e.g. an in-memory exporter)."""

    def __init__(self, *, resource: Resource, sample_ratio: float = 1.0) -> None:
        self._gate = _WhileExporting(ParentBased(TraceIdRatioBased(sample_ratio)))
        super().__init__(resource=resource, sampler=self._gate)

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self._gate.exporting = True


def configure_tracing(
    config: TelemetryConfig, component: str, *, exporter: SpanExporter | None = None
) -> TracerProvider:
    """Set this process's tracer provider once (later calls return it). ``exporter`` overrides
    the configured one (tests use an in-memory exporter)."""
    with _lock:
        provider = _configured.get("provider")
        if provider is not None:
            return provider
        resource = Resource.create(
            {
                "service.name": config.service_name,
                "service.version": __version__,
                "deployment.environment": config.environment,
                "service.instance.id": f"{component}-{os.getpid()}",
                "zimage.component": component,
            }
        )
        provider = PlatformTracerProvider(resource=resource, sample_ratio=config.sample_ratio)
        chosen = exporter or exporter_for(config)
        if chosen is not None:
            provider.add_span_processor(BatchSpanProcessor(chosen, schedule_delay_millis=config.export_interval_ms))
        trace.set_tracer_provider(provider)
        _instrument_libraries(provider)
        _configured["provider"] = provider
        return provider


def _instrument_libraries(provider: TracerProvider) -> None:
    """botocore (S3 calls) and SQLAlchemy (job and ledger writes) get spans of their own."""
    try:
        from opentelemetry.instrumentation.botocore import BotocoreInstrumentor

        BotocoreInstrumentor().instrument(tracer_provider=provider)
    except Exception as exc:  # instrumentation is optional: never break startup over it
        log.warning("botocore instrumentation unavailable: %s", exc)


def instrument_engine(engine, provider: TracerProvider | None = None) -> None:
    """Statement spans for ``engine``. The instrumentor is process-wide and only instruments once,
    so every engine after the first gets an ``EngineTracer`` of its own (a process may hold
    several engines: tests, the CLI, a replica that reconnects)."""
    if getattr(engine, "_zimage_traced", False):
        return
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer

        provider = provider or trace.get_tracer_provider()
        instrumentor = SQLAlchemyInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(engine=engine, tracer_provider=provider)
        else:
            usage = metrics.get_meter(SQL_INSTRUMENTATION).create_up_down_counter(
                "db.client.connections.usage", unit="connections"
            )
            EngineTracer(trace.get_tracer(SQL_INSTRUMENTATION, tracer_provider=provider), engine, usage)
        engine._zimage_traced = True
    except Exception as exc:
        log.warning("SQLAlchemy instrumentation unavailable: %s", exc)


def instrument_app(app, provider: TracerProvider | None = None, *, before: Sequence[Callable] = ()) -> None:
    """Server spans for ``app``. The instrumentation wraps every middleware added with
    ``add_middleware``; ``before`` run outside it, first of all, so a rewrite that takes a
    secret out of the path (the ComfyUI ``/comfy/<key>/`` prefix) happens before any span,
    attribute (``http.target``, ``http.url``) or metric label sees the path."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider or trace.get_tracer_provider(), excluded_urls="healthz,readyz,metrics"
    )
    if before:
        build = app.build_middleware_stack

        def build_middleware_stack():
            stack = build()
            for middleware in reversed(before):
                stack = middleware(stack)
            return stack

        app.build_middleware_stack = build_middleware_stack


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME, __version__)


# -- carrying context in requests --------------------------------------------------------------


def carrier() -> dict[str, str]:
    """The current span's W3C context as a dict that travels with a job or a batch."""
    out: dict[str, str] = {}
    inject(out)
    return out


def context_of(headers: Mapping[str, str] | None) -> otel_context.Context:
    return extract(dict(headers or {}))


def span_context_of(headers: Mapping[str, str] | None) -> trace.SpanContext | None:
    ctx = trace.get_current_span(context_of(headers)).get_span_context()
    return ctx if ctx.is_valid else None


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@contextmanager
def span(name: str, *, parent: Mapping[str, str] | None = None, **attributes: Any) -> Iterator[trace.Span]:
    """A span under ``parent`` (a carried context) or the current one, with attributes."""
    ctx = context_of(parent) if parent is not None else None
    with tracer().start_as_current_span(name, context=ctx, attributes=_clean(attributes)) as current:
        yield current


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}
