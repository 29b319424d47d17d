"""Prometheus metrics: one set of definitions, two ways to export them.

- ``prometheus``: a ``prometheus_client`` registry in this process, served at ``GET /metrics``
  (the in-process platform, the CLI, tests);
- ``ray``: ``ray.util.metrics`` inside Ray Serve replicas, exported by each node's Ray metrics
  agent (KubeRay pods' metrics port; ``serve`` prints the local one). Ray prefixes exported names
  with ``ray_``: ``zimage_images_total`` is scraped as ``ray_zimage_images_total``.

Labels are bounded by design: tenants, endpoints (route templates, never raw paths), pools,
classes, variants, buckets, stages and reason codes. Never job ids or prompts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

Backend = Literal["prometheus", "ray"]

#: Seconds: from a cache hit (ms) to a 50-step 1024² CFG job on a small slice (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class _Metric:
    """A labelled counter, gauge or histogram on either backend."""

    def __init__(
        self, backend: Backend, kind: str, name: str, doc: str, labels: Sequence[str], buckets=None, registry=None
    ):
        self.labels = tuple(labels)
        self.kind = kind
        #: A gauge's last value per label set: the same value again is skipped (the scheduler
        #: publishes its gauges on every dispatch decision; most do not change). Not on Ray: its
        #: exporter lost gauges that were not recorded again (tests/serve/test_metrics_export.py).
        self._last: dict[tuple[str, ...], float] = {}
        self._set_lock = threading.Lock()
        if backend == "ray":
            from ray.util import metrics as ray_metrics

            if kind == "counter":
                self._m = ray_metrics.Counter(name, doc, tag_keys=self.labels)
            elif kind == "gauge":
                self._m = ray_metrics.Gauge(name, doc, tag_keys=self.labels)
            else:
                self._m = ray_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=self.labels)
            self._ray = True
        else:
            import prometheus_client as prom

            cls = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}[kind]
            kwargs: dict[str, Any] = {"registry": registry}
            if kind == "histogram":
                kwargs["buckets"] = buckets
            self._m = cls(name, doc, self.labels, **kwargs)
            self._ray = False

    def _tags(self, values: dict[str, Any]) -> dict[str, str]:
        return {k: str(values.get(k, "")) for k in self.labels}

    def inc(self, value: float = 1.0, **labels: Any) -> None:
        if self._ray:
            self._m.inc(value, tags=self._tags(labels))
        else:
            self._m.labels(**self._tags(labels)).inc(value)

    def set(self, value: float, **labels: Any) -> None:
        tags = self._tags(labels)
        if self._ray:
            self._m.set(value, tags=tags)
            return
        series = tuple(tags.values())
        with self._set_lock:
            if self._last.get(series) == value:
                return
            self._last[series] = value
            self._m.labels(**tags).set(value)

    def observe(self, value: float, **labels: Any) -> None:
        if self._ray:
            self._m.observe(value, tags=self._tags(labels))
        else:
            self._m.labels(**self._tags(labels)).observe(value)


class PlatformMetrics:
    """Every metric the platform exports (names and labels are documented in ``ops/metrics.md``)."""

    def __init__(self, backend: Backend = "prometheus") -> None:
        self.backend = backend
        registry = None
        if backend == "prometheus":
            import prometheus_client as prom

            registry = prom.CollectorRegistry()
        self.registry = registry

        def m(kind: str, name: str, doc: str, labels: Sequence[str], buckets=None) -> _Metric:
            return _Metric(backend, kind, name, doc, labels, buckets, registry)

        self.http_requests = m(
            "counter",
            "zimage_http_requests_total",
            "HTTP requests by tenant, endpoint and status",
            ("tenant", "endpoint", "method", "status"),
        )
        self.http_seconds = m(
            "histogram", "zimage_http_request_seconds", "HTTP request latency", ("endpoint", "method"), LATENCY_BUCKETS
        )
        self.rejections = m(
            "counter", "zimage_rejections_total", "Requests refused or failed, by reason code", ("reason", "status")
        )
        self.jobs = m(
            "counter",
            "zimage_jobs_total",
            "Jobs that reached a terminal state",
            ("variant", "priority_class", "status"),
        )
        self.job_seconds = m(
            "histogram",
            "zimage_job_seconds",
            "Accepted to terminal, per job (the latency a priority class's SLO is written against)",
            ("variant", "priority_class", "status"),
            LATENCY_BUCKETS,
        )
        self.images = m(
            "counter", "zimage_images_total", "Images delivered (stored and billed)", ("variant", "bucket", "pool")
        )
        self.stage_seconds = m(
            "histogram",
            "zimage_stage_seconds",
            "Time per pipeline stage of a batch",
            ("stage", "variant", "bucket"),
            LATENCY_BUCKETS,
        )
        self.queue_depth = m(
            "gauge", "zimage_queue_depth", "Images waiting, per pool and class", ("pool", "priority_class")
        )
        self.queue_wait = m(
            "histogram",
            "zimage_queue_wait_seconds",
            "Time images waited before their batch started",
            ("pool", "priority_class"),
            LATENCY_BUCKETS,
        )
        self.batch_size = m(
            "histogram", "zimage_batch_size", "Requests per engine batch", ("pool", "variant"), BATCH_BUCKETS
        )
        self.engine_busy = m(
            "gauge", "zimage_engine_busy_ratio", "Batches in flight / engine slots", ("pool", "variant")
        )
        self.engine_slots = m(
            "gauge", "zimage_engine_slots", "Engine slots (replicas x concurrent batches)", ("pool", "variant")
        )
        self.s3_errors = m(
            "counter", "zimage_s3_errors_total", "S3 calls that failed (each attempt)", ("operation", "transient")
        )
        self.db_errors = m("counter", "zimage_db_errors_total", "Database statements that failed", ("operation",))
        self.ledger_rows = m("counter", "zimage_ledger_rows_total", "Ledger rows written", ("variant", "pool"))
        self.webhooks = m(
            "counter", "zimage_webhook_deliveries_total", "Webhook deliveries by outcome", ("event", "outcome")
        )
        self.audit_findings = m(
            "gauge",
            "zimage_billing_audit_findings",
            "Findings of the last billing audit, by kind (pushed by `billing audit --pushgateway`)",
            ("kind",),
        )
        self.audit_last_run = m(
            "gauge",
            "zimage_billing_audit_last_run_timestamp_seconds",
            "When the last billing audit finished (Unix time), by outcome",
            ("outcome",),
        )

    def exposition(self) -> bytes:
        """Prometheus text format of this process's registry (``prometheus`` backend)."""
        import prometheus_client as prom

        if self.registry is None:
            raise RuntimeError("metrics are exported by Ray's metrics agent in this process")
        return prom.generate_latest(self.registry)


_lock = threading.Lock()
_current: PlatformMetrics | None = None


def configure_metrics(backend: Backend) -> PlatformMetrics:
    """Choose the backend for this process (first caller wins; Serve replicas choose ``ray``)."""
    global _current
    with _lock:
        if _current is None:
            _current = PlatformMetrics(backend)
        return _current


def metrics() -> PlatformMetrics:
    return _current or configure_metrics("prometheus")


def push_audit_outcome(gateway: str, findings_by_kind: dict[str, int]) -> None:
    """Push a billing audit's outcome to a Pushgateway: the audit runs as a CronJob, not a server.

    ``findings_by_kind`` names every kind (0 when clean), so an alert on ``> 0`` clears after a
    clean run.
    """
    import time

    import prometheus_client as prom

    registry = PlatformMetrics("prometheus")
    for kind, count in findings_by_kind.items():
        registry.audit_findings.set(count, kind=kind)
    registry.audit_last_run.set(time.time(), outcome="findings" if any(findings_by_kind.values()) else "clean")
    prom.push_to_gateway(gateway, job="zimage-billing-audit", registry=registry.registry)
