"""Liveness and readiness: ``/healthz`` (the process answers), ``/readyz`` (it can do work)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text

from zimage_platform.api.deps import Services
from zimage_platform.errors import PlatformError
from zimage_platform.telemetry.metrics import metrics


class NotFound(PlatformError):
    status = 404


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
    and the database and S3 answer."""
    checks: dict[str, Any] = {}
    try:
        await asyncio.to_thread(_db_ping, services)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc}"
    try:
        await asyncio.to_thread(services.results.head, "readyz-probe")
        checks["s3"] = "ok"
    except Exception as exc:
        checks["s3"] = f"error: {exc}"
    try:
        status = await asyncio.wait_for(services.scheduler.status(), timeout=5)
        missing = unserved_variants(status["pools"])
        checks["engines"] = "ok" if not missing else f"no engine loaded for {missing}"
        checks["pools"] = status["pools"]
    except Exception as exc:
        checks["engines"] = f"error: scheduler unreachable ({exc})"
    ready = all(checks[k] == "ok" for k in ("database", "s3", "engines"))
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


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
