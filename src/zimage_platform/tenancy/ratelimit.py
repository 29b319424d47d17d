"""Per-tenant rate limits: requests per minute and images per minute.

Built on the ``limits`` library's moving-window limiter: exact counts over the last minute, with
an in-memory store for one ingress replica and a Redis store (atomic Lua scripts) when several
replicas must share one limit. A rejected request gets 429 with ``Retry-After`` and the
``X-RateLimit-*`` headers; nothing is created or billed for it.

When Redis cannot be reached (every call has short connect/read timeouts and no retries), a
circuit breaker stops dialling it for ``redis_retry_s``; then one call probes it and, if it
answers, the shared limits are back. Meanwhile each limit fails the way its purpose asks:

- **requests per minute fail open**, on a local in-process window holding this replica's share
  (the limit ÷ ingress replicas), so a Redis outage neither takes the API down nor lets one
  replica pass more than its part; answers carry ``X-RateLimit-Degraded``;
- **images per minute fail closed** (images are what is billed and what costs GPU time): 503
  ``rate_limiter_unavailable`` with ``Retry-After`` (when the next probe is due); nothing is created.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItemPerMinute, storage, strategies
from limits.errors import StorageError

from zimage_platform.errors import PlatformError

log = logging.getLogger(__name__)

#: Limits that let requests through (on the replica's share) while the shared store is down;
#: the others refuse them (503) until it is back.
FAIL_OPEN = {"requests": True, "images": False}


class RateLimited(PlatformError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, decision: RateDecision) -> None:
        super().__init__(message)
        self.retry_after_s = decision.retry_after_s
        self.headers = decision.headers()


class RateLimiterUnavailable(PlatformError):
    """The shared rate-limit store is unreachable and this limit fails closed."""

    code = "rate_limiter_unavailable"
    status = 503

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    kind: str
    limit: int
    remaining: int
    reset_at: float
    #: Decided on this replica's local window because the shared store is unreachable.
    degraded: bool = False

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.reset_at - time.time()))

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(self.remaining, 0)),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
            "X-RateLimit-Kind": self.kind,
        }
        if self.degraded:
            headers["X-RateLimit-Degraded"] = RateLimiterUnavailable.code
        return headers


class CircuitBreaker:
    """Fail fast on a dead dependency: after a failure no call is let through for ``cooldown_s``;
    then one call at a time probes it, and the first success closes the breaker again."""

    def __init__(self, cooldown_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._retry_at: float | None = None  # None: closed
        self._probing = False

    @property
    def closed(self) -> bool:
        return self._retry_at is None

    def would_allow(self) -> bool:
        """Whether :meth:`allow` would let a call through now (without taking the probe)."""
        retry_at = self._retry_at
        return retry_at is None or (not self._probing and self._clock() >= retry_at)

    def allow(self) -> bool:
        with self._lock:
            if self._retry_at is None:
                return True
            if self._probing or self._clock() < self._retry_at:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        with self._lock:
            if self._retry_at is not None:
                log.warning("rate-limit store reachable again: shared limits are back")
            self._retry_at, self._probing = None, False

    def failed(self) -> None:
        with self._lock:
            self._retry_at, self._probing = self._clock() + self.cooldown_s, False

    def retry_after_s(self) -> int:
        retry_at = self._retry_at
        return max(1, math.ceil((retry_at - self._clock()) if retry_at is not None else self.cooldown_s))


class TenantRateLimiter:
    """``check_*`` block (on Redis, up to ``timeout_s`` per call): call them from a worker thread,
    or await ``acheck_*`` on an event loop."""

    def __init__(
        self,
        backend: str = "memory",
        *,
        redis_url: str | None = None,
        key_prefix: str = "zimage",
        timeout_s: float = 0.25,
        retry_s: float = 5.0,
        replicas: int = 1,
    ) -> None:
        self.backend = backend
        self.replicas = max(1, replicas)
        self.breaker = CircuitBreaker(retry_s)
        #: (tenant, images per minute) → the decision that left that images window with nothing:
        #: until its oldest hit expires (``reset_at``) no request can pass, so
        #: :meth:`refuse_if_exhausted` refuses without a store call or a parsed body.
        self._exhausted: dict[tuple[str, int], RateDecision] = {}
        #: This replica's own windows: the whole store on ``memory``, the fallback on ``redis``.
        self._local = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self._shared: strategies.MovingWindowRateLimiter | None = None
        if backend == "redis":
            if not redis_url:
                raise ValueError("the redis rate-limit backend needs tenancy.redis_url")
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            store = storage.RedisStorage(
                redis_url,
                key_prefix=key_prefix,
                wrap_exceptions=True,
                socket_connect_timeout=timeout_s,
                socket_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),  # the breaker decides when to try again
            )
            self._shared = strategies.MovingWindowRateLimiter(store)

    @staticmethod
    def _decide(
        limiter: strategies.MovingWindowRateLimiter,
        kind: str,
        tenant_id: str,
        per_minute: int,
        cost: int,
        *,
        degraded: bool = False,
    ) -> RateDecision:
        item = RateLimitItemPerMinute(per_minute)
        allowed = cost <= per_minute and limiter.hit(item, tenant_id, kind, cost=cost)
        stats = limiter.get_window_stats(item, tenant_id, kind)
        return RateDecision(allowed, kind, per_minute, stats.remaining, stats.reset_time, degraded)

    def _hit(self, kind: str, tenant_id: str, per_minute: int, cost: int, *, dial: bool = True) -> RateDecision:
        """The decision for one hit (an images window left empty is remembered until it frees up)."""
        decision = self._hit_store(kind, tenant_id, per_minute, cost, dial=dial)
        if kind == "images" and decision.remaining <= 0 and not decision.degraded:
            self._exhausted[(tenant_id, per_minute)] = decision
        return decision

    def refuse_if_exhausted(self, tenant_id: str, images_per_minute: int) -> None:
        """429 at once while the tenant's images window is known to be full: its last decision
        left nothing, and a moving window frees room only when its oldest hit expires. No store
        call, so a route can ask before it parses and validates the request."""
        key = (tenant_id, images_per_minute)
        decision = self._exhausted.get(key)
        if decision is None:
            return
        if time.time() >= decision.reset_at:
            self._exhausted.pop(key, None)
            return
        raise RateLimited(
            f"the limit of {images_per_minute} images per minute is used up until the oldest of them is a minute old",
            decision=decision,
        )

    def _hit_store(self, kind: str, tenant_id: str, per_minute: int, cost: int, *, dial: bool = True) -> RateDecision:
        """The store's decision for one hit; ``dial=False``: never wait on Redis (the breaker is open)."""
        if self._shared is None:
            return self._decide(self._local, kind, tenant_id, per_minute, cost)
        if dial and self.breaker.allow():
            try:
                decision = self._decide(self._shared, kind, tenant_id, per_minute, cost)
            except StorageError as exc:
                if self.breaker.closed:
                    log.warning(
                        "rate-limit store unreachable (%s): degraded limits for %ss", exc, self.breaker.cooldown_s
                    )
                self.breaker.failed()
            else:
                self.breaker.succeeded()
                return decision
        if not FAIL_OPEN.get(kind, False):
            raise RateLimiterUnavailable(
                f"the rate-limit store cannot be reached, so no {kind} can be counted; nothing was accepted, "
                "retry later",
                retry_after_s=self.breaker.retry_after_s(),
            )
        share = max(1, math.ceil(per_minute / self.replicas))
        return self._decide(self._local, kind, tenant_id, share, cost, degraded=True)

    def _request(self, tenant_id: str, per_minute: int, dial: bool = True) -> RateDecision:
        decision = self._hit("requests", tenant_id, per_minute, 1, dial=dial)
        if not decision.allowed:
            share = " (this replica's share while the rate-limit store is unreachable)" if decision.degraded else ""
            raise RateLimited(f"more than {decision.limit} requests per minute{share}", decision=decision)
        return decision

    def _images(self, tenant_id: str, per_minute: int, images: int, dial: bool = True) -> RateDecision:
        decision = self._hit("images", tenant_id, per_minute, images, dial=dial)
        if not decision.allowed:
            raise RateLimited(
                f"{images} images would pass the limit of {per_minute} images per minute", decision=decision
            )
        return decision

    def check_request(self, tenant_id: str, per_minute: int) -> RateDecision:
        return self._request(tenant_id, per_minute)

    def check_images(self, tenant_id: str, per_minute: int, images: int) -> RateDecision:
        return self._images(tenant_id, per_minute, images)

    def _dials(self) -> bool:
        """Whether a check would talk to Redis now (else it is in-memory and instant)."""
        return self._shared is not None and self.breaker.would_allow()

    async def acheck_request(self, tenant_id: str, per_minute: int) -> RateDecision:
        """:meth:`check_request` in a worker thread when it talks to Redis, else inline."""
        if self._dials():
            return await asyncio.to_thread(self.check_request, tenant_id, per_minute)
        return self._request(tenant_id, per_minute, dial=False)

    async def acheck_images(self, tenant_id: str, per_minute: int, images: int) -> RateDecision:
        """:meth:`check_images` in a worker thread when it talks to Redis, else inline."""
        if self._dials():
            return await asyncio.to_thread(self.check_images, tenant_id, per_minute, images)
        return self._images(tenant_id, per_minute, images, dial=False)
