"""Job webhooks, signed and delivered the Standard Webhooks way (https://www.standardwebhooks.com).

Why it looks the way it does:

- ``webhook-id`` is the event id and stays the same on every retry, so receivers can drop
  duplicates; ``webhook-timestamp`` and the signature are made fresh per attempt, because
  receivers refuse timestamps older than a few minutes.
- Signing uses the ``standardwebhooks`` reference library, so any receiver using a Standard
  Webhooks SDK (or Svix's) verifies our requests without custom code.
- Delivery retries what a retry can fix (network errors, timeouts, 408, 429, 5xx) with
  exponential backoff and jitter, and gives up at once on other answers (a 404 or 401 will
  not change by itself). Redirects are not followed: they could lead past the SSRF check.
- Outside the embedded default, targets must be public addresses: a tenant's webhook URL must
  not become a way to reach the cluster's internals (metadata service, databases, Ray).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import random
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx
from standardwebhooks import Webhook

from zimage_platform.errors import InvalidRequest
from zimage_platform.netsafe import WEBHOOK_URLS

log = logging.getLogger(__name__)

EVENT_TYPES = ("job.started", "job.progress", "job.succeeded", "job.failed", "job.cancelled")
TERMINAL_EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.cancelled"})
#: Standard Webhooks recommends 24–64 random bytes per secret.
SECRET_BYTES = 32
USER_AGENT = "zimage-platform-webhooks/1"


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def generate_secret() -> str:
    """A new signing secret in the ``whsec_<base64>`` form every Standard Webhooks SDK reads."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


@dataclass(frozen=True)
class WebhookEvent:
    type: str
    job_id: str
    tenant_id: str
    data: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_event_id)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown webhook event type {self.type!r}; expected one of {EVENT_TYPES}")
        if self.created_at.tzinfo is None:
            raise ValueError("created_at must be timezone-aware")

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENT_TYPES

    def payload(self) -> bytes:
        """The request body: compact JSON with sorted keys, so the same event always signs the same."""
        body = {
            "type": self.type,
            "timestamp": self.created_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            # The job and tenant are the event's identity: data cannot override them.
            "data": {**self.data, "job_id": self.job_id, "tenant_id": self.tenant_id},
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def sign_headers(secret: str | Sequence[str], event_id: str, body: bytes, at: datetime) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt.

    Several secrets give several space-separated signatures, so a tenant can rotate its secret
    without a window where its receiver rejects us.
    """
    keys = [secret] if isinstance(secret, str) else list(secret)
    if not keys:
        raise ValueError("at least one webhook secret is needed")
    text = body.decode()
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(key).sign(event_id, at, text) for key in keys),
    }


def validate_webhook_url(url: str, *, allow_private: bool = False) -> str:
    """Accept ``url`` as a webhook target or raise InvalidRequest (``webhook_url_invalid``).

    ``allow_private`` lets loopback and private networks through: for the embedded default and
    tests, never for a multi-tenant deployment. Resolution happens here *and* again before each
    delivery (see :class:`WebhookSender`), since DNS answers can change after registration.
    """
    return WEBHOOK_URLS.validate(url, allow_private=allow_private)


# -- progress throttling ------------------------------------------------------------------------


class ProgressThrottle:
    """At most one ``job.progress`` per job per ``min_interval_s``; every other event passes.

    A 50-step job must not turn into 50 webhook calls; the terminal event always follows, so a
    dropped progress event loses nothing a receiver needs.
    """

    def __init__(self, min_interval_s: float = 0.5, max_jobs: int = 100_000) -> None:
        self.min_interval_s = min_interval_s
        self.max_jobs = max_jobs
        self._last_sent: OrderedDict[str, float] = OrderedDict()

    def should_send(self, job_id: str, now: float | None = None, event_type: str = "job.progress") -> bool:
        """``now`` is a monotonic time in seconds (``time.monotonic()`` when left out)."""
        if event_type in TERMINAL_EVENT_TYPES:
            self._last_sent.pop(job_id, None)  # the job is over: forget it
            return True
        if event_type != "job.progress":
            return True
        now = time.monotonic() if now is None else now
        last = self._last_sent.get(job_id)
        if last is not None and now - last < self.min_interval_s:
            return False
        self._last_sent[job_id] = now
        self._last_sent.move_to_end(job_id)
        if len(self._last_sent) > self.max_jobs:  # jobs whose terminal event never came (crashed replica)
            self._last_sent.popitem(last=False)
        return True


# -- durability hook ----------------------------------------------------------------------------


class WebhookOutbox(Protocol):
    """Where the sender reports each attempt and the outcome (the jobs database in production).

    The event itself is stored by the caller before :meth:`WebhookSender.deliver` runs, so a
    restart can re-send anything not marked delivered or failed. Methods are called from a worker
    thread, so a blocking database write does not stall the event loop.
    """

    def record_attempt(self, event_id: str, status_code: int | None, error: str | None) -> None: ...

    def mark_delivered(self, event_id: str) -> None: ...

    def mark_failed(self, event_id: str, reason: str) -> None: ...


@dataclass(frozen=True)
class AttemptRecord:
    status_code: int | None
    error: str | None


class MemoryOutbox:
    """In-memory :class:`WebhookOutbox` for tests and the embedded default."""

    def __init__(self) -> None:
        self.attempts: dict[str, list[AttemptRecord]] = {}
        self.delivered: set[str] = set()
        self.failed: dict[str, str] = {}

    def record_attempt(self, event_id: str, status_code: int | None, error: str | None) -> None:
        self.attempts.setdefault(event_id, []).append(AttemptRecord(status_code, error))

    def mark_delivered(self, event_id: str) -> None:
        self.delivered.add(event_id)

    def mark_failed(self, event_id: str, reason: str) -> None:
        self.failed[event_id] = reason


# -- delivery -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    attempts: int
    status_code: int | None = None
    error: str | None = None


RETRYABLE_STATUSES = frozenset({408, 429})


def _retryable(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class WebhookSender:
    """Delivers one event to one URL with retries; share one sender (one connection pool) per process."""

    def __init__(
        self,
        *,
        outbox: WebhookOutbox | None = None,
        client: httpx.AsyncClient | None = None,
        allow_private: bool = False,
        timeout_s: float = 10.0,
        max_attempts: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        jitter: float = 0.2,
        max_retry_after_s: float = 60.0,
    ) -> None:
        """Attempt ``n`` (from 1) waits ``backoff_s * 2**(n-1)`` (capped, ±``jitter`` fraction) before the next.

        A ``Retry-After`` from a 429/503 stretches the wait up to ``max_retry_after_s``.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.outbox = outbox
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.jitter = jitter
        self.max_retry_after_s = max_retry_after_s
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(follow_redirects=False, headers={"user-agent": USER_AGENT})

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        delay *= 1 + random.uniform(-self.jitter, self.jitter)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    async def deliver(self, url: str, secret: str | Sequence[str], event: WebhookEvent) -> DeliveryResult:
        """POST ``event`` to ``url`` until a 2xx, a permanent refusal, or the attempts run out."""
        try:
            await WEBHOOK_URLS.validate_async(url, allow_private=self.allow_private)
        except InvalidRequest as exc:
            return await self._finish(event, DeliveryResult(False, 0, None, f"{exc.code}: {exc.message}"))

        body = event.payload()
        status: int | None = None
        error: str | None = None
        for attempt in range(1, self.max_attempts + 1):
            status, error, retry_after = await self._attempt(url, secret, event, body)
            await self._outbox("record_attempt", event.id, status, error)
            if status is not None and 200 <= status < 300:
                return await self._finish(event, DeliveryResult(True, attempt, status))
            if status is not None and not _retryable(status):
                return await self._finish(event, DeliveryResult(False, attempt, status, error))
            if attempt < self.max_attempts:
                delay = self.backoff(attempt, retry_after)
                log.info(
                    "webhook %s to %s: attempt %d failed (%s), retry in %.2fs", event.id, url, attempt, error, delay
                )
                await asyncio.sleep(delay)
        return await self._finish(event, DeliveryResult(False, self.max_attempts, status, error))

    async def _attempt(
        self, url: str, secret: str | Sequence[str], event: WebhookEvent, body: bytes
    ) -> tuple[int | None, str | None, float | None]:
        """One signed POST: (status, error, Retry-After seconds). The response body is never read."""
        headers = {"content-type": "application/json", **sign_headers(secret, event.id, body, datetime.now(UTC))}
        try:
            # A total deadline: httpx's timeouts are per read, so a receiver dripping bytes could hold us.
            async with asyncio.timeout(self.timeout_s):
                async with self._client.stream(
                    "POST", url, content=body, headers=headers, timeout=self.timeout_s
                ) as response:
                    status = response.status_code
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except (TimeoutError, httpx.TimeoutException):
            return None, f"timed out after {self.timeout_s}s", None
        except httpx.TransportError as exc:
            return None, f"{type(exc).__name__}: {exc}", None
        error = None if 200 <= status < 300 else f"HTTP {status}"
        return status, error, retry_after

    async def _finish(self, event: WebhookEvent, result: DeliveryResult) -> DeliveryResult:
        if result.delivered:
            await self._outbox("mark_delivered", event.id)
        else:
            await self._outbox("mark_failed", event.id, result.error or "not delivered")
        return result

    async def _outbox(self, method: str, *args: Any) -> None:
        if self.outbox is not None:
            await asyncio.to_thread(getattr(self.outbox, method), *args)
