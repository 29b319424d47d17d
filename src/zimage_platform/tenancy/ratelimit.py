"""Per-tenant rate limits: requests per minute and images per minute.

Built on the ``limits`` library's moving-window limiter: exact counts over the last minute, with
an in-memory store for one ingress replica and a Redis store (atomic Lua scripts) when several
replicas must share one limit. A rejected request gets 429 with ``Retry-After`` and the
``X-RateLimit-*`` headers; nothing is created or billed for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute, storage, strategies

from zimage_platform.errors import PlatformError


class RateLimited(PlatformError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, decision: RateDecision) -> None:
        super().__init__(message)
        self.retry_after_s = decision.retry_after_s
        self.headers = decision.headers()


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    kind: str
    limit: int
    remaining: int
    reset_at: float

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.reset_at - time.time()))

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(self.remaining, 0)),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
            "X-RateLimit-Kind": self.kind,
        }


class TenantRateLimiter:
    def __init__(self, backend: str = "memory", *, redis_url: str | None = None, key_prefix: str = "zimage") -> None:
        if backend == "redis":
            if not redis_url:
                raise ValueError("the redis rate-limit backend needs tenancy.redis_url")
            store = storage.RedisStorage(redis_url, key_prefix=key_prefix)
        else:
            store = storage.MemoryStorage()
        self.backend = backend
        self._limiter = strategies.MovingWindowRateLimiter(store)

    def _hit(self, kind: str, tenant_id: str, per_minute: int, cost: int) -> RateDecision:
        item = RateLimitItemPerMinute(per_minute)
        allowed = cost <= per_minute and self._limiter.hit(item, tenant_id, kind, cost=cost)
        stats = self._limiter.get_window_stats(item, tenant_id, kind)
        return RateDecision(allowed, kind, per_minute, stats.remaining, stats.reset_time)

    def check_request(self, tenant_id: str, per_minute: int) -> RateDecision:
        decision = self._hit("requests", tenant_id, per_minute, 1)
        if not decision.allowed:
            raise RateLimited(f"more than {per_minute} requests per minute", decision=decision)
        return decision

    def check_images(self, tenant_id: str, per_minute: int, images: int) -> RateDecision:
        decision = self._hit("images", tenant_id, per_minute, images)
        if not decision.allowed:
            raise RateLimited(
                f"{images} images would pass the limit of {per_minute} images per minute", decision=decision
            )
        return decision
