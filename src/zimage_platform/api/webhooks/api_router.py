"""HTTP routes of ``/v1/webhooks``: list deliveries (dead letters too), redeliver, read and rotate the secret."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from zimage_platform.api.deps import Services, Tenant
from zimage_platform.api.webhooks import serving
from zimage_platform.api.webhooks.protocol import Delivery, DeliveryList, WebhookSecret

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/deliveries", response_model=DeliveryList)
async def list_deliveries(
    services: Services,
    tenant: Tenant,
    status: Annotated[str | None, Query(pattern="^(pending|delivered|dead_letter)$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[datetime | None, Query(description="Only events queued before this (to page).")] = None,
) -> dict:
    """Your webhook events, newest first; `?status=dead_letter` lists the ones given up on."""
    return {"object": "list", "data": await serving.list_deliveries(services, tenant, status, limit, before)}


@router.get("/deliveries/{delivery_id}", response_model=Delivery)
async def get_delivery(delivery_id: str, services: Services, tenant: Tenant) -> dict:
    return await serving.get_delivery(services, tenant, delivery_id)


@router.post("/deliveries/{delivery_id}/redeliver", response_model=Delivery, status_code=202)
async def redeliver(delivery_id: str, services: Services, tenant: Tenant) -> dict:
    """Send a dead-lettered (or delivered) event again, same `webhook-id`, with a fresh retry window;
    409 `delivery_pending` while it is still being delivered."""
    return await serving.redeliver(services, tenant, delivery_id)


@router.get("/secret", response_model=WebhookSecret)
async def get_secret(services: Services, tenant: Tenant) -> dict:
    """Your signing secret(s); 409 `webhook_secret_external` when your operator manages it."""
    return await serving.get_secret(services, tenant)


@router.post("/secret/rotate", response_model=WebhookSecret)
async def rotate_secret(services: Services, tenant: Tenant) -> dict:
    """A new secret now; the previous one keeps signing too (a second signature) until its `expires_at`."""
    return await serving.rotate_secret(services, tenant)
