"""Rate limits on the in-memory store and on a real Redis shared by two 'replicas'."""

from __future__ import annotations

import time
import uuid

import pytest

from zimage_platform.tenancy.ratelimit import RateLimited, RateLimiterUnavailable, TenantRateLimiter


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


def test_a_full_images_window_is_refused_without_a_store_call(limiter, monkeypatch):
    """Once a decision leaves the window empty, nothing can pass until its oldest hit expires:
    the next request is refused from memory (a flood over its limit costs no round trip)."""
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    limiter.refuse_if_exhausted(tenant, 8)  # nothing known: no refusal
    limiter.check_images(tenant, 8, 4)
    limiter.refuse_if_exhausted(tenant, 8)  # 4 left
    limiter.check_images(tenant, 8, 4)
    monkeypatch.setattr(limiter, "_hit_store", lambda *a, **k: pytest.fail("the store was asked"))
    with pytest.raises(RateLimited) as err:
        limiter.refuse_if_exhausted(tenant, 8)
    assert err.value.headers["X-RateLimit-Kind"] == "images" and err.value.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= err.value.retry_after_s <= 61
    limiter.refuse_if_exhausted(tenant, 9)  # the operator raised the limit: not known to be full
    limiter.refuse_if_exhausted(f"{tenant}-other", 8)
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    limiter.refuse_if_exhausted(tenant, 8)  # its oldest hit has expired: asked again, not refused here


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


def _dead_redis_limiter(**kw) -> TenantRateLimiter:
    from services import closed_port

    url = f"redis://127.0.0.1:{closed_port()}/0"
    return TenantRateLimiter("redis", redis_url=url, key_prefix="zimage-test-dead", **kw)


def test_redis_down_requests_pass_on_the_replica_share_images_are_refused():
    """Nothing listens where Redis should be: requests/min fail open, on this replica's share of
    the limit (10 per minute over 2 replicas: 5 here); images/min fail closed with 503."""
    limiter = _dead_redis_limiter(replicas=2, retry_s=60)
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    decisions = [limiter.check_request(tenant, 10) for _ in range(5)]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert decisions[0].headers()["X-RateLimit-Degraded"] == "rate_limiter_unavailable"
    with pytest.raises(RateLimited) as over:
        limiter.check_request(tenant, 10)
    assert "share" in over.value.message and over.value.headers["X-RateLimit-Limit"] == "5"
    with pytest.raises(RateLimiterUnavailable) as refused:
        limiter.check_images(tenant, 100, 1)
    assert refused.value.status == 503 and refused.value.code == "rate_limiter_unavailable"
    assert 1 <= refused.value.retry_after_s <= 60


def test_a_dead_redis_is_not_dialled_per_request_and_is_used_again_when_back():
    """A real Redis stopped and started again on its port: while it is down the circuit breaker
    dials it once per ``retry_s``, not per request; once it answers, the shared limit is back."""
    import redis as redis_client
    from bench.services import PrivateRedis

    with PrivateRedis() as server:
        limiter = TenantRateLimiter("redis", redis_url=server.url, key_prefix="zimage-test-cb", retry_s=0.5)
        dials: list[str] = []
        real_hit = limiter._shared.hit

        def counted_hit(*args, **kwargs):
            dials.append("hit")
            return real_hit(*args, **kwargs)

        limiter._shared.hit = counted_hit
        tenant = f"t-{uuid.uuid4().hex[:6]}"
        assert not limiter.check_request(tenant, 100).degraded and len(dials) == 1
        server.stop()
        degraded = [limiter.check_request(tenant, 100) for _ in range(20)]
        assert all(d.degraded for d in degraded) and len(dials) == 2  # one failed dial, then none
        with pytest.raises(RateLimiterUnavailable):
            limiter.check_images(tenant, 100, 1)
        assert len(dials) == 2
        server.start()
        time.sleep(0.6)  # the breaker lets one call probe again
        back = limiter.check_images(tenant, 100, 3)
        assert not back.degraded and back.remaining == 97 and len(dials) == 3
        assert not limiter.check_request(tenant, 100).degraded  # the shared window again
        keys = redis_client.Redis.from_url(server.url).keys("zimage-test-cb*")
        assert len(keys) == 2  # requests and images windows, in Redis


async def test_a_redis_that_never_answers_neither_hangs_nor_blocks_the_event_loop():
    """A port that accepts connections but never answers (a hung Redis): each call gives up after
    ``timeout_s`` (no retries), and the awaitable checks run off the event loop."""
    import asyncio
    import socket

    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
        url = f"redis://127.0.0.1:{black_hole.getsockname()[1]}/0"
        limiter = TenantRateLimiter("redis", redis_url=url, key_prefix="zimage-test-hung", timeout_s=0.3, retry_s=60)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(RateLimiterUnavailable):
            await asyncio.wait_for(limiter.acheck_images("t", 10, 1), timeout=5)
        took = time.monotonic() - started
        decision = await asyncio.wait_for(limiter.acheck_request("t", 10), timeout=5)  # breaker open: instant
        beat.cancel()
    assert 0.25 <= took < 2.0 and decision.degraded
    assert ticks >= 10  # the loop kept running while the call waited on its socket
