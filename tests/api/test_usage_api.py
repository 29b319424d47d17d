"""Billing through the platform path: delivered images are billed once, cancelled ones never,
and ``GET /v1/usage`` shows each tenant only its own usage."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import select

from tenants import add_tenant
from zimage_platform.billing import LedgerEntryRow


async def finish(client: httpx.AsyncClient, job_id: str, headers=None) -> dict:
    async with asyncio.timeout(60):
        while (job := (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json())["status"] in (
            "queued",
            "running",
        ):
            await asyncio.sleep(0.05)
    return job


async def test_usage_and_ledger_rows_from_real_jobs(client: httpx.AsyncClient, platform, api_config):
    key = add_tenant(api_config, "billed", plan="enterprise")
    headers = {"Authorization": f"Bearer {key}"}
    done = await finish(
        client,
        (
            await client.post(
                "/v1/jobs", json={"prompt": "bill me", "n": 2, "size": "256x256", "steps": 2}, headers=headers
            )
        ).json()["id"],
        headers,
    )
    slow = (
        await client.post(
            "/v1/jobs",
            json={"variant": "base", "prompt": "never billed", "size": "512x512", "steps": 50},
            headers=headers,
        )
    ).json()
    while (await client.get(f"/v1/jobs/{slow['id']}", headers=headers)).json()["status"] == "queued":
        await asyncio.sleep(0.01)
    await client.post(f"/v1/jobs/{slow['id']}/cancel", headers=headers)
    assert (await finish(client, slow["id"], headers))["status"] == "cancelled"

    with platform.services.store.session() as s:
        rows = list(s.scalars(select(LedgerEntryRow).where(LedgerEntryRow.tenant_id == "billed")))
    assert {(r.job_id, r.image_index) for r in rows} == {(done["id"], 0), (done["id"], 1)}
    row = rows[0]
    assert row.plan == "enterprise" and row.backend == "torch" and row.pool == "cpu" and row.gpu_seconds > 0
    assert row.trace_id == done["trace_id"] and row.sha256 == done["images"][row.image_index]["sha256"]

    usage = (await client.get("/v1/usage?group_by=variant", headers=headers)).json()
    assert usage["tenant"] == "billed" and usage["data"] == [
        {
            "variant": "turbo",
            "images": 2,
            "gpu_seconds": usage["data"][0]["gpu_seconds"],
            "amount": str(sum(r.unit_price for r in rows)),
            "currency": "USD",
        }
    ]
    by_day = (await client.get("/v1/usage", headers=headers)).json()
    assert by_day["group_by"] == "day" and by_day["total"]["images"] == 2
    other = (await client.get("/v1/usage")).json()  # the default client's tenant (acme)
    assert other["tenant"] == "acme" and all(line["images"] >= 0 for line in other["data"])
    bad = await client.get("/v1/usage?from=2026-05-01&to=2026-04-01", headers=headers)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_date_range"
