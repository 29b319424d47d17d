"""The trace context of one HTTP request, as the rest of the platform needs it.

The FastAPI instrumentation opens the server span (honouring an incoming W3C ``traceparent``);
this records its trace id (returned as ``X-Trace-Id``, stored with the job, its bill and its S3
objects) and the carrier that travels with the job to the scheduler and the engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zimage_platform.telemetry.tracing import carrier, current_trace_id


@dataclass(frozen=True)
class RequestTrace:
    trace_id: str | None
    #: W3C headers (``traceparent``) of the request's span.
    carrier: dict[str, str] = field(default_factory=dict)

    @property
    def traceparent(self) -> str | None:
        return self.carrier.get("traceparent")

    @classmethod
    def current(cls) -> RequestTrace:
        return cls(current_trace_id(), carrier())
