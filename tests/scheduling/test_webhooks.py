"""Webhooks: Standard Webhooks signatures, one attempt against a real HTTP receiver, the retry policy, throttling."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from webhook_receiver import Receiver, Step
from zimage_platform.errors import InvalidRequest
from zimage_platform.scheduling.webhooks import (
    Attempt,
    ProgressThrottle,
    RetryPolicy,
    WebhookEvent,
    WebhookSender,
    generate_secret,
    parse_retry_after,
    sign_headers,
    validate_webhook_url,
)
from zimage_platform.storage.seaweedfs import free_ports

SECRET = generate_secret()


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    server = Receiver(SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    return receiver_server.reset()


def event(type_: str = "job.succeeded", **data: object) -> WebhookEvent:
    return WebhookEvent(type=type_, job_id="job_1", tenant_id="acme", data=dict(data))


def attempt(url: str, ev: WebhookEvent, **options: object) -> Attempt:
    """One attempt by a sender like production's (loopback allowed unless ``allow_private=False``)."""
    settings: dict = {"allow_private": True, "timeout_s": 2.0, **options}

    async def run() -> Attempt:
        async with WebhookSender(**settings) as sender:
            return await sender.attempt(url, SECRET, ev)

    return asyncio.run(run())


# -- events and signatures ----------------------------------------------------------------------


def test_payload_is_compact_sorted_json() -> None:
    ev = WebhookEvent(
        type="job.progress",
        job_id="job_1",
        tenant_id="acme",
        data={"step": 3, "steps": 8, "job_id": "spoofed"},
        id="evt_1",
        created_at=datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=UTC),
    )
    assert ev.payload() == (
        b'{"data":{"job_id":"job_1","step":3,"steps":8,"tenant_id":"acme"},'
        b'"timestamp":"2025-03-01T12:00:00.250Z","type":"job.progress"}'
    )


def test_event_ids_are_unique_and_types_checked() -> None:
    assert len({event().id for _ in range(100)}) == 100
    assert event().id.startswith("evt_")
    with pytest.raises(ValueError):
        event("job.exploded")
    with pytest.raises(ValueError):
        WebhookEvent(type="job.started", job_id="j", tenant_id="t", created_at=datetime(2025, 1, 1))


def test_generate_secret_is_whsec_base64() -> None:
    one, two = generate_secret(), generate_secret()
    assert one != two and one.startswith("whsec_")
    assert len(base64.b64decode(one.removeprefix("whsec_"))) == 32


def test_signature_verifies_and_tampering_fails() -> None:
    ev = event(image_count=2)
    body = ev.payload()
    headers = sign_headers(SECRET, ev.id, body, datetime.now(UTC))
    assert headers["webhook-id"] == ev.id
    assert Webhook(SECRET).verify(body, headers)["data"]["image_count"] == 2

    tampered = body.replace(b'"image_count":2', b'"image_count":3')
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):  # a replayed id with another id's signature
        Webhook(SECRET).verify(body, {**headers, "webhook-id": "evt_other"})
    stale = sign_headers(SECRET, ev.id, body, datetime.now(UTC) - timedelta(minutes=10))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(body, stale)


def test_rotation_signs_with_every_secret() -> None:
    old, new = generate_secret(), generate_secret()
    ev = event()
    headers = sign_headers([old, new], ev.id, ev.payload(), datetime.now(UTC))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(ev.payload(), headers)


# -- one attempt ---------------------------------------------------------------------------------


def test_delivered_and_verified(receiver: Receiver) -> None:
    ev = event(images=["s3://results/a.png"])
    result = attempt(receiver.url("ok"), ev)
    assert result == Attempt(200, None) and result.delivered and not result.retryable
    (call,) = receiver.calls_to("ok")
    assert call.verified and call.body == ev.payload()
    assert call.headers["content-type"] == "application/json"
    assert json.loads(call.body)["type"] == "job.succeeded"


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
def test_other_4xx_is_permanent(receiver: Receiver, status: int) -> None:
    result = attempt(receiver.url("gone", Step(status)), event())
    assert result == Attempt(status, "http_status") and not result.retryable


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    """A redirect could point past the SSRF check, so it counts as a refusal."""
    receiver.url("target")
    url = receiver.url("moved", Step(307, headers={"location": f"{receiver.base_url}/target"}))
    result = attempt(url, event())
    assert result.status_code == 307 and not result.delivered and not result.retryable
    assert receiver.calls_to("target") == []


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_retryable_statuses(receiver: Receiver, status: int) -> None:
    result = attempt(receiver.url("busy", Step(status)), event())
    assert result.status_code == status and result.retryable


def test_retry_after_is_read(receiver: Receiver) -> None:
    result = attempt(receiver.url("slow-down", Step(429, headers={"retry-after": "30"})), event())
    assert result.retry_after_s == 30.0 and result.retryable


def test_a_slow_receiver_times_out_at_the_deadline(receiver: Receiver) -> None:
    started = time.monotonic()
    result = attempt(receiver.url("stuck", Step(200, delay_s=2.0)), event(), timeout_s=0.2)
    assert result == Attempt(None, "timeout") and result.retryable
    assert time.monotonic() - started < 1.5


def test_connection_refused_is_a_reason_code_not_exception_text() -> None:
    (port,) = free_ports(1)  # nothing listens there
    result = attempt(f"http://127.0.0.1:{port}/hook", event())
    assert result == Attempt(None, "connect_failed") and result.retryable


def test_sender_refuses_private_targets_in_production_mode(receiver: Receiver) -> None:
    result = attempt(receiver.url("ok"), event(), allow_private=False)
    assert result == Attempt(None, "not_public") and not result.retryable
    assert receiver.calls == []


def test_a_webhook_host_rebound_to_loopback_never_reaches_loopback(receiver: Receiver, dns, connects) -> None:
    """Checked as public, then answering 127.0.0.1 (DNS rebinding): every attempt connects to an
    address from the one resolution it checked, so none reaches the loopback receiver."""
    answers, lookups = dns
    answers["hooks.rebind.test"] = ["93.184.216.34", "93.184.216.34", "127.0.0.1"]
    port = int(receiver.base_url.rsplit(":", 1)[1])
    url = f"http://hooks.rebind.test:{port}/ok"
    receiver.url("ok")
    validate_webhook_url(url)  # accepted at submission: public then
    for _ in range(3):  # the retries resolve again, and must check again
        result = attempt(url, event(), allow_private=False)
        assert result.reason in ("connect_failed", "not_public") and not result.delivered
    assert receiver.calls == []
    # The first attempt went to the address it checked (the public one); the later ones were
    # refused on their own resolution before connecting anywhere.
    assert connects == [("93.184.216.34", port)] and len(lookups) == 4


# -- retry policy --------------------------------------------------------------------------------


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=4.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    jittery = RetryPolicy(backoff_s=1.0, jitter=0.2)
    assert all(0.8 <= jittery.backoff(1) <= 1.2 for _ in range(50))
    assert policy.backoff(1, retry_after=3.0) == 3.0
    assert policy.backoff(1, retry_after=1000.0) == 4.0  # Retry-After is honoured up to the cap


def test_next_attempt_until_the_maximum_age() -> None:
    policy = RetryPolicy(backoff_s=10.0, jitter=0.0)
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    later = now + timedelta(hours=1)
    assert policy.next_attempt_at(Attempt(503, "http_status"), 1, now, later) == now + timedelta(seconds=10)
    assert policy.next_attempt_at(Attempt(None, "timeout"), 2, now, later) == now + timedelta(seconds=20)
    # Past the deadline, or a refusal a retry cannot fix: no next attempt (a dead letter).
    assert policy.next_attempt_at(Attempt(503, "http_status"), 1, now, now + timedelta(seconds=5)) is None
    assert policy.next_attempt_at(Attempt(404, "http_status"), 1, now, later) is None
    assert policy.next_attempt_at(Attempt(None, "not_public"), 1, now, later) is None
    assert policy.next_attempt_at(Attempt(None, "unresolvable"), 1, now, later) is not None


def test_parse_retry_after() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("Sat, 01 Mar 2025 12:00:07 GMT", now) == 7.0
    assert parse_retry_after("Sat, 01 Mar 2025 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- URL validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "http:///no-host",
        "https://user:password@93.184.216.34/hook",
        "http://93.184.216.34:99999/",
    ],
)
def test_url_must_be_plain_http(url: str) -> None:
    for allow_private in (True, False):
        with pytest.raises(InvalidRequest) as info:
            validate_webhook_url(url, allow_private=allow_private)
        assert info.value.code == "webhook_url_invalid" and info.value.param == "webhook_url"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata service
        "http://0.0.0.0/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://2130706433/hook",  # 127.0.0.1 as one number
        "http://0x7f.1/hook",  # 127.0.0.1 in hex shorthand
    ],
)
def test_private_targets_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_webhook_url(url)
    assert info.value.code == "webhook_url_invalid"
    assert validate_webhook_url(url, allow_private=True) == url


def test_public_targets_pass() -> None:
    for url in ("https://93.184.216.34/hooks/zimage", "http://[2606:2800:220:1:248:1893:25c8:1946]:8443/x"):
        assert validate_webhook_url(url) == url


# -- progress throttling ------------------------------------------------------------------------


def test_progress_throttle() -> None:
    throttle = ProgressThrottle(min_interval_s=0.5)
    sent = [t for t in (0.0, 0.1, 0.49, 0.5, 0.7, 1.2) if throttle.should_send("job_a", t)]
    assert sent == [0.0, 0.5, 1.2]
    # Jobs are throttled independently; non-progress events always pass.
    assert throttle.should_send("job_b", 0.7)
    assert throttle.should_send("job_a", 1.3, "job.started")
    assert throttle.should_send("job_a", 1.3, "job.succeeded")
    # After a terminal event the job is forgotten: a re-run's first progress passes.
    assert throttle.should_send("job_a", 1.35)


def test_progress_throttle_is_bounded() -> None:
    throttle = ProgressThrottle(min_interval_s=10, max_jobs=2)
    for job in ("a", "b", "c"):
        assert throttle.should_send(job, 0.0)
    assert not throttle.should_send("c", 1.0)
    assert throttle.should_send("a", 1.0)  # evicted as the oldest, so it passes again
