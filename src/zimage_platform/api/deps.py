"""FastAPI dependencies: the platform services, the caller's tenant, the trace context.

All ``async`` (as every route): FastAPI runs a plain ``def`` in anyio's thread pool, and under
Ray Serve's event loop each such call first scans every task of the loop (anyio finds no root
task there), which under a flood of requests became the ingress's largest cost. Blocking work
goes to ``asyncio.to_thread`` (tests/api/test_event_loop_path.py keeps it so).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Header, Request

from zimage_platform.api.services import PlatformServices
from zimage_platform.telemetry.context import RequestTrace
from zimage_platform.telemetry.tracing import span
from zimage_platform.tenancy import TenantSpec

#: The largest integer a query parameter may carry into SQL: PostgreSQL's INTEGER (32 bits) is the
#: narrowest column one is compared with. Larger ones are a 422 naming the bound, not an overflow
#: inside the database driver (a 500).
MAX_QUERY_INT = 2**31 - 1


async def services(request: Request) -> PlatformServices:
    return request.app.state.services


def api_key_from(authorization: str | None, x_api_key: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


async def tenant(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> TenantSpec:
    """The caller's tenant: 401 without a valid key, 403 when suspended, 429 over its request rate.
    The key check is in memory; re-reading the tenant files, when due, runs in a worker thread."""
    services: PlatformServices = request.app.state.services
    registry = services.tenants
    if registry.reload_due():
        await asyncio.to_thread(registry.reload)
    with span("auth"):
        found = registry.authenticate(api_key_from(authorization, x_api_key))
    return await admit(request, found)


async def admit(request: Request, found: TenantSpec) -> TenantSpec:
    """Count an authenticated request against its tenant's request rate (429 over it); a Redis
    round trip (bounded by ``tenancy.redis_timeout_s``) runs in a worker thread, never on the loop."""
    services: PlatformServices = request.app.state.services
    request.state.tenant_id = found.id
    with span("rate_limit", tenant=found.id, backend=services.rate_limiter.backend):
        request.state.rate = await services.rate_limiter.acheck_request(found.id, found.limits.requests_per_minute)
    return found


async def generating(request: Request, tenant: Annotated[TenantSpec, Depends(tenant)]) -> TenantSpec:
    """:func:`tenant`, for routes that create images: a tenant whose images-per-minute window is
    known to be full is refused (429) before its request is parsed or validated."""
    services: PlatformServices = request.app.state.services
    services.rate_limiter.refuse_if_exhausted(tenant.id, tenant.limits.images_per_minute)
    return tenant


async def trace(request: Request) -> RequestTrace:
    return RequestTrace.current()


Services = Annotated[PlatformServices, Depends(services)]
Tenant = Annotated[TenantSpec, Depends(tenant)]
Generating = Annotated[TenantSpec, Depends(generating)]
Trace = Annotated[RequestTrace, Depends(trace)]
