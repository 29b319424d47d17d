"""Idempotency-Key on the synchronous images API: a retried request gets the same images."""

from __future__ import annotations

import httpx
from sqlalchemy import func, select

from zimage_platform.scheduling.models import JobRow


async def test_a_replayed_generation_returns_the_same_images(client: httpx.AsyncClient, platform):
    """Issue 12: same key + same body → the earlier job's images (200, nothing generated again);
    the same key with another body → 409 ``idempotency_conflict``."""
    body = {"prompt": "a red mug", "size": "64x64", "steps": 2, "seed": 5, "response_format": "b64_json"}
    headers = {"Idempotency-Key": "sync-order-7"}
    first = await client.post("/v1/images/generations", json=body, headers=headers)
    again = await client.post("/v1/images/generations", json=body, headers=headers)
    assert first.status_code == 200 and again.status_code == 200, again.text
    assert again.json() == first.json()  # the same job, the same PNG bytes
    as_url = await client.post("/v1/images/generations", json={**body, "response_format": "url"}, headers=headers)
    assert as_url.status_code == 409 and as_url.json()["error"]["code"] == "idempotency_conflict"
    with platform.services.store.session() as s:
        jobs = s.scalar(select(func.count()).select_from(JobRow).where(JobRow.idempotency_key == "sync-order-7"))
    assert jobs == 1
