"""Serving logic of ``/v1/webhooks``: the outbox and the secrets, always scoped to the caller."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from zimage_platform.api.services import PlatformServices
from zimage_platform.scheduling.deliveries import DeliveryOutbox
from zimage_platform.scheduling.models import WebhookDeliveryRow
from zimage_platform.tenancy import TenantSpec
from zimage_platform.tenancy.webhook_secrets import SigningSecret, WebhookSecrets


def _outbox(services: PlatformServices) -> DeliveryOutbox:
    return DeliveryOutbox(services.store, max_age_s=services.config.webhooks.max_age_s)


def _secrets(services: PlatformServices) -> WebhookSecrets:
    return WebhookSecrets.from_config(services.config, services.store.engine, services.tenants.get)


def delivery_view(row: WebhookDeliveryRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "job_id": row.job_id,
        "event_type": row.event_type,
        "url": row.url,
        "status": row.status,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "created_at": row.created_at,
        "last_attempt_at": row.last_attempt_at,
        "next_attempt_at": row.next_attempt_at if row.status == "pending" else None,
        "delivered_at": row.delivered_at,
        "give_up_at": row.give_up_at if row.status == "pending" else None,
    }


async def list_deliveries(
    services: PlatformServices, tenant: TenantSpec, status: str | None, limit: int, before: datetime | None
) -> list[dict[str, Any]]:
    rows = await asyncio.to_thread(_outbox(services).of_tenant, tenant.id, status=status, limit=limit, before=before)
    return [delivery_view(row) for row in rows]


async def get_delivery(services: PlatformServices, tenant: TenantSpec, delivery_id: str) -> dict[str, Any]:
    return delivery_view(await asyncio.to_thread(_outbox(services).get, tenant.id, delivery_id))


async def redeliver(services: PlatformServices, tenant: TenantSpec, delivery_id: str) -> dict[str, Any]:
    """Queue the event again (same id); the scheduler's dispatcher sends it within ``poll_s``."""
    return delivery_view(await asyncio.to_thread(_outbox(services).redeliver, tenant.id, delivery_id))


def _secret_view(secrets: list[SigningSecret]) -> dict[str, Any]:
    return {"data": [{"secret": s.secret, "generation": s.generation, "expires_at": s.expires_at} for s in secrets]}


async def get_secret(services: PlatformServices, tenant: TenantSpec) -> dict[str, Any]:
    return _secret_view(await asyncio.to_thread(_secrets(services).for_tenant, tenant))


async def rotate_secret(services: PlatformServices, tenant: TenantSpec) -> dict[str, Any]:
    secrets = await asyncio.to_thread(_secrets(services).rotate, tenant)
    await asyncio.to_thread(
        services.audit.record,
        "webhook_secret.rotated",
        actor=f"tenant:{tenant.id}",
        tenant_id=tenant.id,
        generation=secrets[0].generation,
    )
    return _secret_view(secrets)
