"""The HTTP application: routers per feature, one error shape, limits, trace context."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from zimage_platform import __version__
from zimage_platform.api.batches.api_router import router as batches_router
from zimage_platform.api.comfy.api_router import ComfyKeyPrefix
from zimage_platform.api.comfy.api_router import install as install_comfy
from zimage_platform.api.errors import error_body, install_error_handlers
from zimage_platform.api.frontend.api_router import install as install_frontend
from zimage_platform.api.health.api_router import router as health_router
from zimage_platform.api.images.api_router import router as images_router
from zimage_platform.api.jobs.api_router import router as jobs_router
from zimage_platform.api.models.api_router import router as models_router
from zimage_platform.api.services import PlatformServices
from zimage_platform.api.usage.api_router import router as usage_router
from zimage_platform.api.userdata.api_router import install as install_userdata
from zimage_platform.api.webhooks.api_router import router as webhooks_router
from zimage_platform.api.workflows.api_router import router as workflows_router
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.telemetry.metrics import metrics
from zimage_platform.telemetry.tracing import configure_tracing, instrument_app

DESCRIPTION = """Multi-tenant inference for the Z-Image family (Turbo, Base, Edit).

Authenticate with `Authorization: Bearer <key>` or `X-API-Key: <key>`. Errors always look like
`{"error": {"type", "code", "message", "param"}}` (plus `choices` when you picked from a set).
Send a W3C `traceparent` to join your trace; every response carries `X-Trace-Id`.
"""


class BodyLimit:
    """Refuse bodies over the limit before reading them (413), declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        import json

        body = json.dumps(
            error_body(413, "body_too_large", f"request bodies are limited to {self.max_bytes} bytes")
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_api(services: PlatformServices) -> FastAPI:
    app = FastAPI(title="zimage-platform", version=__version__, description=DESCRIPTION)
    app.state.services = services
    install_error_handlers(app)

    @app.middleware("http")
    async def trace_headers(request: Request, call_next):
        # Inside the instrumentation's server span: its trace continues the caller's traceparent.
        trace = RequestTrace.current()
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics().http_requests.inc(
            tenant=getattr(request.state, "tenant_id", "-"),
            endpoint=endpoint,
            method=request.method,
            status=response.status_code,
        )
        metrics().http_seconds.observe(time.perf_counter() - started, endpoint=endpoint, method=request.method)
        if trace.trace_id:
            response.headers["X-Trace-Id"] = trace.trace_id
            response.headers["traceparent"] = trace.traceparent or ""
        rate = getattr(request.state, "rate", None)
        if rate is not None and "X-RateLimit-Limit" not in response.headers:
            response.headers.update(rate.headers())
        return response

    for router in (
        images_router,
        jobs_router,
        batches_router,
        workflows_router,
        models_router,
        usage_router,
        webhooks_router,
        health_router,
    ):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=services.config.limits.max_body_bytes)
    # The /comfy/<key>/ rewrite runs first of all, outside the tracing middleware: no span sees the key.
    instrument_app(app, configure_tracing(services.config.telemetry, "ingress"), before=[ComfyKeyPrefix])
    install_comfy(app)
    install_userdata(app)
    install_frontend(app)  # the login and the ComfyUI frontend's files, after every API route
    return app
