"""Job webhooks, signed and delivered the Standard Webhooks way (https://www.standardwebhooks.com).

Why it looks the way it does:

- ``webhook-id`` is the event id and stays the same on every retry, so receivers can drop
  duplicates; ``webhook-timestamp`` and the signature are made fresh per attempt, because
  receivers refuse timestamps older than a few minutes.
- Signing uses the ``standardwebhooks`` reference library, so any receiver using a Standard
  Webhooks SDK (or Svix's) verifies our requests without custom code.
- Delivery retries what a retry can fix (network errors, timeouts, 408, 429, 5xx) with
  exponential backoff and jitter until a maximum age, and dead-letters at once on other answers
  (a 404 or 401 will not change by itself); the tenant lists dead letters and redelivers them.
  Attempts are scheduled in the outbox, not slept on (:mod:`~zimage_platform.scheduling.deliveries`).
  Redirects are not followed: they could lead past the SSRF check.
- Outside the embedded default, targets must be public addresses: a tenant's webhook URL must
  not become a way to reach the cluster's internals (metadata service, databases, Ray). The
  address is checked as the connection is made, on the same DNS answer it connects to.
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
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from zimage_platform.netsafe import REFUSAL_REASONS, WEBHOOK_URLS, UrlError, failure_reason

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
    tests, never for a multi-tenant deployment. This is the early refusal; every connection
    checks the address it connects to again (see :class:`WebhookSender`).
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


# -- one attempt ---------------------------------------------------------------------------------


RETRYABLE_STATUSES = frozenset({408, 429})
#: URL refusals a later attempt can get past (a DNS outage); the others need the tenant to act.
RETRYABLE_REFUSALS = frozenset({"unresolvable"})


@dataclass(frozen=True)
class Attempt:
    """What one POST came to: the receiver's status, or a reason code (never exception or body text)."""

    status_code: int | None
    #: None when delivered; ``http_status``, a :data:`~zimage_platform.netsafe.FAILURE_REASONS`
    #: code, a URL refusal (:data:`~zimage_platform.netsafe.REFUSAL_REASONS`) or ``secret_unavailable``.
    reason: str | None
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        """Network trouble, 408, 429 and 5xx may pass later; other answers (a 404, a 401, a redirect,
        a private address) will not change by themselves."""
        if self.delivered:
            return False
        if self.status_code is not None:
            return self.status_code in RETRYABLE_STATUSES or self.status_code >= 500
        return self.reason not in REFUSAL_REASONS or self.reason in RETRYABLE_REFUSALS


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


@dataclass(frozen=True)
class RetryPolicy:
    """When the next attempt is, and when to stop: retries back off exponentially (with jitter)
    until ``max_age_s`` after the event was queued; then the event is dead-lettered (listed for
    the tenant, who can redeliver it)."""

    backoff_s: float = 1.0
    max_backoff_s: float = 3600.0
    jitter: float = 0.2
    max_age_s: float = 86400.0

    def backoff(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``attempts`` failed attempts (1-based); a ``Retry-After`` from the
        receiver stretches the wait, up to ``max_backoff_s``."""
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempts - 1))
        delay *= 1 + random.uniform(-self.jitter, self.jitter)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay

    def next_attempt_at(self, attempt: Attempt, attempts: int, now: datetime, give_up_at: datetime) -> datetime | None:
        """When to try again after this failed ``attempt`` (the ``attempts``-th), or None: dead-letter."""
        if not attempt.retryable:
            return None
        at = now + timedelta(seconds=self.backoff(attempts, attempt.retry_after_s))
        return at if at <= give_up_at else None


class WebhookSender:
    """Signs and POSTs one attempt; share one sender (one connection pool) per process.

    Its client connects only to checked public addresses (:meth:`UrlPolicy.client`), one
    resolution per connection, so a DNS answer that changes after the check cannot send a
    delivery into the cluster. Each attempt has a total deadline (``timeout_s``), short so a slow
    receiver holds one of its own tenant's delivery slots only briefly.
    """

    def __init__(self, *, allow_private: bool = False, timeout_s: float = 5.0) -> None:
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        # No pool-wide connection cap: the dispatcher caps deliveries per tenant, and a shared cap
        # would let one tenant's slow receivers hold every connection.
        self._client = WEBHOOK_URLS.client(
            allow_private=allow_private,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
            headers={"user-agent": USER_AGENT},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def attempt(self, url: str, secret: str | Sequence[str], event: WebhookEvent) -> Attempt:
        """One signed POST. The response body is never read; failures become reason codes."""
        body = event.payload()
        headers = {"content-type": "application/json", **sign_headers(secret, event.id, body, datetime.now(UTC))}
        try:
            WEBHOOK_URLS.parse(url)
            # A total deadline: httpx's timeouts are per read, so a receiver dripping bytes could hold us.
            async with asyncio.timeout(self.timeout_s):
                async with self._client.stream(
                    "POST", url, content=body, headers=headers, timeout=self.timeout_s
                ) as response:
                    status = response.status_code
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
        except UrlError as exc:
            return Attempt(None, exc.reason)
        except (TimeoutError, httpx.HTTPError) as exc:
            reason = failure_reason(exc)
            log.info("webhook %s to %s failed: %s (%s)", event.id, _origin(url), reason, exc)
            return Attempt(None, reason)
        return Attempt(status, None if 200 <= status < 300 else "http_status", retry_after)


def _origin(url: str) -> str:
    """Scheme, host and port only: a webhook URL's path or query may hold the tenant's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
