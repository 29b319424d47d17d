"""Webhooks: Standard Webhooks signatures, delivery with retries against a real HTTP receiver, throttling."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zimage_platform.errors import InvalidRequest
from zimage_platform.scheduling.webhooks import (
    DeliveryResult,
    MemoryOutbox,
    ProgressThrottle,
    WebhookEvent,
    WebhookSender,
    generate_secret,
    parse_retry_after,
    sign_headers,
    validate_webhook_url,
)
from zimage_platform.storage.seaweedfs import free_ports

SECRET = generate_secret()


@dataclass(frozen=True)
class Step:
    """One scripted answer of the receiver."""

    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float


class Receiver:
    """A webhook receiver that verifies every request like a tenant's would, and answers from a script."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.scripts: dict[str, list[Step]] = {}
        self.app = Starlette(routes=[Route("/{name}", self.handle, methods=["POST"])])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def url(self, name: str, *steps: Step) -> str:
        self.scripts[name] = list(steps) or [Step()]
        return f"{self.base_url}/{name}"

    def calls_to(self, name: str) -> list[Call]:
        return [call for call in self.calls if call.path == f"/{name}"]

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        try:
            Webhook(SECRET).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        name = request.path_params["name"]
        self.calls.append(Call(request.url.path, headers, body, verified, time.monotonic()))
        script = self.scripts.get(name, [Step(404)])
        step = script[min(len(self.calls_to(name)), len(script)) - 1]
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        return Response(status_code=step.status, headers=step.headers)

    def start(self) -> Receiver:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("webhook receiver did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    receiver_server.calls.clear()
    receiver_server.scripts.clear()
    return receiver_server


def event(type_: str = "job.succeeded", **data: object) -> WebhookEvent:
    return WebhookEvent(type=type_, job_id="job_1", tenant_id="acme", data=dict(data))


def deliver(url: str, ev: WebhookEvent, outbox: MemoryOutbox | None = None, **options: object) -> DeliveryResult:
    settings: dict = {"allow_private": True, "backoff_s": 0.001, "timeout_s": 2.0, "max_attempts": 5, **options}

    async def run() -> DeliveryResult:
        async with WebhookSender(outbox=outbox, **settings) as sender:
            return await sender.deliver(url, SECRET, ev)

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


# -- delivery -----------------------------------------------------------------------------------


def test_delivered_and_verified(receiver: Receiver) -> None:
    outbox = MemoryOutbox()
    ev = event(images=["s3://results/a.png"])
    result = deliver(receiver.url("ok"), ev, outbox)
    assert result == DeliveryResult(delivered=True, attempts=1, status_code=200)
    (call,) = receiver.calls_to("ok")
    assert call.verified and call.body == ev.payload()
    assert call.headers["content-type"] == "application/json"
    assert json.loads(call.body)["type"] == "job.succeeded"
    assert outbox.delivered == {ev.id} and not outbox.failed


def test_retries_keep_the_webhook_id(receiver: Receiver) -> None:
    outbox = MemoryOutbox()
    ev = event()
    result = deliver(receiver.url("flaky", Step(500), Step(502), Step(200)), ev, outbox)
    assert result.delivered and result.attempts == 3
    calls = receiver.calls_to("flaky")
    assert [c.headers["webhook-id"] for c in calls] == [ev.id] * 3
    assert all(c.verified for c in calls)
    assert [a.status_code for a in outbox.attempts[ev.id]] == [500, 502, 200]
    assert outbox.delivered == {ev.id}


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
def test_other_4xx_is_permanent(receiver: Receiver, status: int) -> None:
    outbox = MemoryOutbox()
    ev = event()
    result = deliver(receiver.url("gone", Step(status), Step(200)), ev, outbox)
    assert not result.delivered and result.attempts == 1 and result.status_code == status
    assert len(receiver.calls_to("gone")) == 1
    assert outbox.failed == {ev.id: f"HTTP {status}"}


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    """A redirect could point past the SSRF check, so it counts as a refusal."""
    receiver.url("target")
    url = receiver.url("moved", Step(307, headers={"location": f"{receiver.base_url}/target"}))
    result = deliver(url, event())
    assert not result.delivered and result.attempts == 1 and result.status_code == 307
    assert receiver.calls_to("target") == []


@pytest.mark.parametrize("status", [408, 429, 503])
def test_retryable_statuses(receiver: Receiver, status: int) -> None:
    result = deliver(receiver.url("busy", Step(status), Step(200)), event())
    assert result.delivered and result.attempts == 2


def test_retry_after_is_honoured_up_to_the_cap(receiver: Receiver) -> None:
    url = receiver.url("slow-down", Step(429, headers={"retry-after": "30"}), Step(200))
    result = deliver(url, event(), max_retry_after_s=0.3)
    assert result.delivered and result.attempts == 2
    first, second = receiver.calls_to("slow-down")
    # Backoff alone is ~1 ms: the wait came from Retry-After, clamped to 0.3 s rather than 30 s.
    assert 0.3 <= second.at - first.at < 2.0


def test_timeout_is_retried(receiver: Receiver) -> None:
    outbox = MemoryOutbox()
    ev = event()
    result = deliver(receiver.url("stuck", Step(200, delay_s=1.0), Step(200)), ev, outbox, timeout_s=0.2)
    assert result.delivered and result.attempts == 2
    first, second = outbox.attempts[ev.id]
    assert first.status_code is None and "timed out" in (first.error or "")
    assert second.status_code == 200


def test_attempts_run_out(receiver: Receiver) -> None:
    outbox = MemoryOutbox()
    ev = event()
    result = deliver(receiver.url("down", Step(500)), ev, outbox, max_attempts=4)
    assert not result.delivered and result.attempts == 4 and result.status_code == 500
    assert len(receiver.calls_to("down")) == 4
    assert outbox.failed == {ev.id: "HTTP 500"}


def test_connection_refused_is_retried() -> None:
    (port,) = free_ports(1)  # nothing listens there
    outbox = MemoryOutbox()
    ev = event()
    result = deliver(f"http://127.0.0.1:{port}/hook", ev, outbox, max_attempts=3)
    assert not result.delivered and result.attempts == 3 and result.status_code is None
    assert "ConnectError" in (result.error or "")
    assert len(outbox.attempts[ev.id]) == 3 and ev.id in outbox.failed


def test_sender_refuses_private_targets_in_production_mode(receiver: Receiver) -> None:
    outbox = MemoryOutbox()
    ev = event()
    result = deliver(receiver.url("ok"), ev, outbox, allow_private=False)
    assert not result.delivered and result.attempts == 0
    assert (result.error or "").startswith("webhook_url_invalid")
    assert receiver.calls == [] and ev.id in outbox.failed


def test_backoff_grows_and_is_capped() -> None:
    sender = WebhookSender(backoff_s=0.5, max_backoff_s=4.0, jitter=0.0)
    assert [sender.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    jittery = WebhookSender(backoff_s=1.0, jitter=0.2)
    assert all(0.8 <= jittery.backoff(1) <= 1.2 for _ in range(50))
    assert sender.backoff(1, retry_after=3.0) == 3.0
    assert sender.backoff(1, retry_after=1000.0) == 60.0  # max_retry_after_s


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
