"""Liveness and readiness: ``/healthz`` (the process answers), ``/readyz`` (it can do work)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text

from zimage_platform.api.deps import Services
from zimage_platform.errors import PlatformError
from zimage_platform.telemetry.metrics import metrics


class NotFound(PlatformError):
    status = 404


log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics() -> PlainTextResponse:
    """This process's metrics (in-process platform). Inside Ray Serve the replicas' metrics are
    exported by Ray's metrics agent instead (with a ``ray_`` prefix); this answers 404 there."""
    registry = metrics()
    if registry.backend != "prometheus":
        raise NotFound("metrics are exported by Ray's metrics agent on each node", code="metrics_elsewhere")
    return PlainTextResponse(registry.exposition(), media_type="text/plain; version=0.0.4")


@router.get("/readyz")
async def readyz(services: Services) -> JSONResponse:
    """Ready when every variant has a loaded engine (or a pool that scales up from zero for it)
    and the database and S3 answer. Unauthenticated, so it says only ``ok``/``fail`` per check
    and a reason code for each failure; what failed, and why, goes to the log."""
    checks: dict[str, str] = {}
    reasons: dict[str, str] = {}

    def failed(check: str, reason: str, detail: object, level: int = logging.WARNING) -> None:
        checks[check], reasons[check] = "fail", reason
        log.log(level, "readyz: %s failed (%s): %s", check, reason, detail)

    try:
        await asyncio.to_thread(_db_ping, services)
        checks["database"] = "ok"
    except Exception as exc:
        failed("database", "database_unreachable", exc)
    try:
        await asyncio.to_thread(services.results.head, "readyz-probe")
        checks["s3"] = "ok"
    except Exception as exc:
        failed("s3", "s3_unreachable", exc)
    try:
        status = await asyncio.wait_for(services.scheduler.status(), timeout=5)
    except Exception as exc:
        failed("engines", "scheduler_unreachable", exc)
    else:
        missing = unserved_variants(status["pools"])
        if missing:
            # Expected while engines load: not a warning.
            failed("engines", "engines_not_loaded", f"no engine loaded for {missing}", logging.INFO)
        else:
            checks["engines"] = "ok"
    ready = not reasons
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": checks}
    if reasons:
        body["reasons"] = reasons
    return JSONResponse(body, status_code=200 if ready else 503)


def unserved_variants(pools: dict[str, Any]) -> list[str]:
    """Variants no pool can run now: none has a loaded engine for them, and no pool serving them
    scales from zero (such a pool starts a replica when work waits, so it needs none to be ready)."""
    served, known = set(), set()
    for pool in pools.values():
        for variant, info in pool["engines"].items():
            known.add(variant)
            if info["capacity"] > 0 or pool.get("min_replicas") == 0:
                served.add(variant)
    return sorted(known - served)


def _db_ping(services) -> None:
    with services.store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
