"""Rate limits on the in-memory store and on a real Redis shared by two 'replicas'."""

from __future__ import annotations

import time
import uuid

import pytest

from zimage_platform.tenancy.ratelimit import RateLimited, TenantRateLimiter


@pytest.fixture(params=["memory", "redis"])
def limiter(request) -> TenantRateLimiter:
    if request.param == "memory":
        return TenantRateLimiter("memory")
    url = request.getfixturevalue("redis_url")
    return TenantRateLimiter("redis", redis_url=url, key_prefix=f"zimage-test-{uuid.uuid4().hex[:8]}")


def test_requests_over_the_limit_get_429_with_headers(limiter):
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    decisions = [limiter.check_request(tenant, 5) for _ in range(5)]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    with pytest.raises(RateLimited) as err:
        limiter.check_request(tenant, 5)
    assert err.value.status == 429 and err.value.code == "rate_limited"
    assert 1 <= err.value.retry_after_s <= 61
    headers = err.value.headers
    assert headers["X-RateLimit-Limit"] == "5" and headers["X-RateLimit-Remaining"] == "0"
    assert int(headers["X-RateLimit-Reset"]) >= int(time.time())
    limiter.check_request(f"{tenant}-other", 5)  # other tenants are not affected


def test_images_cost_their_count(limiter):
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    limiter.check_images(tenant, 10, 4)
    limiter.check_images(tenant, 10, 4)
    with pytest.raises(RateLimited):
        limiter.check_images(tenant, 10, 4)
    limiter.check_images(tenant, 10, 2)
    with pytest.raises(RateLimited):
        limiter.check_images(tenant, 10, 11)  # never fits


def test_two_replicas_share_one_limit_on_redis(redis_url):
    prefix = f"zimage-test-{uuid.uuid4().hex[:8]}"
    a, b = (TenantRateLimiter("redis", redis_url=redis_url, key_prefix=prefix) for _ in range(2))
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    allowed = 0
    for i in range(20):
        try:
            (a if i % 2 else b).check_request(tenant, 7)
            allowed += 1
        except RateLimited:
            pass
    assert allowed == 7
    # Each replica on its own memory store would have let 14 through: that is what Redis is for.
    c, d = TenantRateLimiter("memory"), TenantRateLimiter("memory")
    assert sum(1 for i in range(14) if (c if i % 2 else d).check_request(tenant, 7)) == 14
