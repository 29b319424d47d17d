"""Tenancy over the HTTP API: rate limits with headers, quota, concurrency cap, content policy,
suspension — and rejected requests leave no job behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import yaml

from tenants import add_tenant

FAST = {"size": "64x64", "steps": 2}


@pytest.fixture(scope="module")
def tight(api_config, platform) -> dict[str, str]:
    return {
        "rpm": add_tenant(api_config, "tight-rpm", limits={"requests_per_minute": 3}),
        "ipm": add_tenant(api_config, "tight-ipm", limits={"images_per_minute": 3}),
        "quota": add_tenant(api_config, "tight-quota", limits={"monthly_images": 3}),
        "conc": add_tenant(api_config, "tight-conc", limits={"concurrent_jobs": 1}),
        "small": add_tenant(api_config, "small-only", limits={"max_pixels": 64 * 64, "allowed_variants": ["turbo"]}),
        "policy": add_tenant(
            api_config, "no-brands", policy={"extra_rules": [{"id": "brand.globex", "terms": ["globex"]}]}
        ),
    }


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def jobs_of(client, key) -> int:
    return len((await client.get("/v1/jobs", headers=as_(key))).json()["data"])


async def test_request_rate_limit_answers_429_with_headers(client: httpx.AsyncClient, tight):
    ok = await client.get("/v1/models", headers=as_(tight["rpm"]))
    assert ok.headers["x-ratelimit-limit"] == "3" and ok.headers["x-ratelimit-remaining"] == "2"
    await client.get("/v1/models", headers=as_(tight["rpm"]))
    await client.get("/v1/models", headers=as_(tight["rpm"]))
    limited = await client.post("/v1/jobs", json={"prompt": "x", **FAST}, headers=as_(tight["rpm"]))
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1 and limited.headers["x-ratelimit-remaining"] == "0"


async def test_image_rate_limit_counts_images(client: httpx.AsyncClient, tight):
    assert (
        await client.post("/v1/jobs", json={"prompt": "x", "n": 2, **FAST}, headers=as_(tight["ipm"]))
    ).status_code == 202
    over = await client.post("/v1/jobs", json={"prompt": "x", "n": 2, **FAST}, headers=as_(tight["ipm"]))
    assert over.status_code == 429 and over.headers["x-ratelimit-kind"] == "images"
    assert await jobs_of(client, tight["ipm"]) == 1


async def test_a_full_images_window_is_refused_before_the_request_is_read(client: httpx.AsyncClient, api_config):
    """A flood over its limit costs the ingress next to nothing: once the tenant's window is
    full, its next generation request is a 429 before its body is validated or a job prepared
    (an invalid body gets the 429 too; it could not be accepted before the window frees up)."""
    key = add_tenant(api_config, "full-window", limits={"images_per_minute": 2})
    await asyncio.sleep(api_config.tenancy.reload_s + 1.0)
    assert (await client.post("/v1/jobs", json={"prompt": "x", "n": 2, **FAST}, headers=as_(key))).status_code == 202
    for path, body in (("/v1/jobs", {"prompt": "x", "size": "bogus"}), ("/v1/images/generations", {"prompt": 7})):
        refused = await client.post(path, json=body, headers=as_(key))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited", refused.text
        assert refused.headers["x-ratelimit-kind"] == "images" and int(refused.headers["retry-after"]) >= 1
    assert (await client.get("/v1/jobs", headers=as_(key))).status_code == 200  # reading is not refused


async def test_redis_down_requests_pass_images_answer_503(client: httpx.AsyncClient, platform, api_config, monkeypatch):
    """The shared rate-limit store is unreachable: calls still answer (requests/min on this
    replica's share, flagged), generation answers 503 rate_limiter_unavailable with Retry-After
    and creates nothing — not a 500 on every call."""
    from services import closed_port
    from zimage_platform.tenancy.ratelimit import TenantRateLimiter

    dead = TenantRateLimiter("redis", redis_url=f"redis://127.0.0.1:{closed_port()}/0", key_prefix="zimage-test")
    monkeypatch.setattr(platform.app.state.services, "rate_limiter", dead)
    key = add_tenant(api_config, "redis-down")
    listed = await client.get("/v1/jobs", headers=as_(key))
    assert listed.status_code == 200 and listed.headers["x-ratelimit-degraded"] == "rate_limiter_unavailable"
    for path in ("/v1/jobs", "/v1/images/generations"):
        refused = await client.post(path, json={"prompt": "x", **FAST}, headers=as_(key))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "rate_limiter_unavailable"
        assert 1 <= int(refused.headers["retry-after"]) <= 5
    assert await jobs_of(client, key) == 0


async def test_monthly_quota(client: httpx.AsyncClient, tight):
    assert (
        await client.post("/v1/jobs", json={"prompt": "x", "n": 2, **FAST}, headers=as_(tight["quota"]))
    ).status_code == 202
    over = await client.post("/v1/jobs", json={"prompt": "x", "n": 2, **FAST}, headers=as_(tight["quota"]))
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
    assert int(over.headers["retry-after"]) > 0
    assert await jobs_of(client, tight["quota"]) == 1
    assert (
        await client.post("/v1/jobs", json={"prompt": "x", "n": 1, **FAST}, headers=as_(tight["quota"]))
    ).status_code == 202


async def test_concurrency_cap(client: httpx.AsyncClient, tight):
    first = await client.post(
        "/v1/jobs",
        json={"variant": "base", "prompt": "slow", "size": "512x512", "steps": 40},
        headers=as_(tight["conc"]),
    )
    assert first.status_code == 202
    second = await client.post("/v1/jobs", json={"prompt": "x", **FAST}, headers=as_(tight["conc"]))
    assert second.status_code == 429 and second.json()["error"]["code"] == "concurrency_limit"
    assert "retry-after" in second.headers
    await client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=as_(tight["conc"]))


async def test_per_tenant_size_and_variant_limits(client: httpx.AsyncClient, tight):
    big = await client.post("/v1/jobs", json={"prompt": "x", "size": "128x128"}, headers=as_(tight["small"]))
    assert big.status_code == 422 and big.json()["error"]["code"] == "size_not_allowed"
    assert big.json()["error"]["choices"] == ["64x64"]
    base = await client.post("/v1/jobs", json={"variant": "base", "prompt": "x", **FAST}, headers=as_(tight["small"]))
    assert base.json()["error"]["code"] == "variant_not_allowed"
    models = (await client.get("/v1/models", headers=as_(tight["small"]))).json()
    assert [m["variant"] for m in models["data"]] == ["turbo"]


async def test_content_policy_blocks_audits_and_creates_nothing(client: httpx.AsyncClient, tight, platform):
    blocked = await client.post(
        "/v1/jobs", json={"prompt": "如何製作炸彈 (tutorial)", **FAST}, headers=as_(tight["policy"])
    )
    error = blocked.json()["error"]
    assert (
        blocked.status_code == 422 and error["code"] == "content_policy" and "violence.explosives" in error["message"]
    )
    assert "炸" not in error["message"]
    brand = await client.post(
        "/v1/images/generations", json={"prompt": "G L O B E X logo", "size": "64x64"}, headers=as_(tight["policy"])
    )
    assert brand.json()["error"]["code"] == "content_policy" and "brand.globex" in brand.json()["error"]["message"]
    negative = await client.post(
        "/v1/jobs", json={"prompt": "a cat", "negative_prompt": "cocaine", **FAST}, headers=as_(tight["policy"])
    )
    assert negative.json()["error"]["param"] == "negative_prompt"
    assert await jobs_of(client, tight["policy"]) == 0
    events = platform.services.audit.events(tenant_id="no-brands", action="policy.blocked")
    assert {e.details["rule_id"] for e in events} == {"violence.explosives", "brand.globex", "drugs.hard"}
    assert all("prompt" not in str(e.details.get("rule_id")) for e in events)


async def test_suspension_takes_effect_without_a_restart(client: httpx.AsyncClient, api_config):
    key = add_tenant(api_config, "to-suspend")
    assert (await client.get("/v1/models", headers=as_(key))).status_code == 200
    path = Path(api_config.tenancy.dirs[0]) / "to-suspend.yaml"
    spec = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**spec, "status": "suspended", "suspended_reason": "fraud review"}))
    await asyncio.sleep(0.05)
    response = await client.get("/v1/models", headers=as_(key))
    assert response.status_code == 403
    assert (
        response.json()["error"]["code"] == "tenant_suspended" and "fraud review" in response.json()["error"]["message"]
    )
