"""Job webhooks end to end: a local receiver verifies Standard Webhooks signatures."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
import pytest_asyncio
import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zimage_platform.scheduling.webhooks import sign_headers


class Receiver:
    """A real HTTP server on loopback that fails the first delivery of each event once (or, with
    ``status`` set, answers that to everything)."""

    def __init__(self, secret: str, status: int | None = None) -> None:
        self.secret = secret
        self.status = status
        self.events: list[dict] = []
        self.ids: list[str] = []
        self.seen_once: set[str] = set()

        async def hook(request: Request) -> Response:
            body = await request.body()
            Webhook(self.secret).verify(body, dict(request.headers))
            event_id = request.headers["webhook-id"]
            self.ids.append(event_id)
            if self.status is not None:
                if self.status < 300:
                    self.events.append(json.loads(body))
                return Response(status_code=self.status)
            if event_id not in self.seen_once:
                self.seen_once.add(event_id)
                return Response(status_code=503)
            self.events.append(json.loads(body))
            return Response(status_code=204)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(
                Starlette(routes=[Route("/hook", hook, methods=["POST"])]),
                host="127.0.0.1",
                port=self.port,
                log_level="error",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest_asyncio.fixture(scope="module")
async def secret(client: httpx.AsyncClient) -> str:
    """acme's own signing secret, as acme reads it."""
    response = await client.get("/v1/webhooks/secret")
    assert response.status_code == 200, response.text
    (current,) = response.json()["data"]
    return current["secret"]


async def delivered_outbox(platform, job_id: str) -> list:
    """The job's outbox rows once its first and last events and every row are delivered.

    The platform marks a row delivered only after the receiver answered 2xx, so by then the
    receiver holds every event the test asserts on (a retried event may land after a later one).
    """
    store = platform.scheduler.store
    async with asyncio.timeout(60):
        while True:
            rows = await asyncio.to_thread(store.deliveries, job_id)
            types = {r.event_type for r in rows}
            if {"job.started", "job.succeeded"} <= types and all(r.status == "delivered" for r in rows):
                return rows
            await asyncio.sleep(0.05)


async def test_signed_events_with_retries_and_stable_ids(client: httpx.AsyncClient, secret: str, platform):
    with Receiver(secret) as receiver:
        response = await client.post(
            "/v1/jobs", json={"prompt": "hooked", "size": "64x64", "steps": 6, "webhook_url": receiver.url}
        )
        job_id = response.json()["id"]
        rows = await delivered_outbox(platform, job_id)
    # Deliveries are independent (a retried event may land after a later one): order by timestamp.
    events = sorted(receiver.events, key=lambda e: e["timestamp"])
    types = [e["type"] for e in events]
    assert types[0] == "job.started" and types[-1] == "job.succeeded"
    assert all(e["data"]["job_id"] == job_id for e in receiver.events)
    # Every recorded event arrived exactly once, after being refused once and retried under the
    # same webhook-id (at-least-once, dedupable).
    assert sorted(receiver.ids) == sorted(r.id for r in rows for _ in range(2))
    assert len(receiver.events) == len(rows) and all(r.attempts == 2 for r in rows)
    # Progress goes out at most every 500 ms per job, however long the job takes (less a few ms:
    # timestamps are whole milliseconds, read just after the throttle's clock).
    progress = [datetime.fromisoformat(e["timestamp"]) for e in events if e["type"] == "job.progress"]
    assert all((b - a).total_seconds() >= 0.45 for a, b in itertools.pairwise(progress)), progress


async def test_tenants_have_their_own_secrets(client: httpx.AsyncClient, keys, secret: str):
    """Before, every tenant without its own secret shared one: any tenant could sign events that
    another tenant's receiver accepted."""
    globex = await client.get("/v1/webhooks/secret", headers={"Authorization": f"Bearer {keys['globex']}"})
    theirs = globex.json()["data"][0]["secret"]
    assert theirs.startswith("whsec_") and theirs != secret
    body = json.dumps({"type": "job.succeeded", "data": {"tenant_id": "acme"}}).encode()
    forged = sign_headers(theirs, "evt_forged", body, datetime.now(UTC))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, forged)


async def test_dead_letters_are_listed_for_their_tenant_and_redelivered(
    client: httpx.AsyncClient, keys, secret: str, platform
):
    receiver = Receiver(secret, status=410)  # the receiver refuses for good: dead letters at once
    with receiver:
        response = await client.post(
            "/v1/jobs", json={"prompt": "hooked", "size": "64x64", "steps": 2, "webhook_url": receiver.url}
        )
        job_id = response.json()["id"]
        store = platform.scheduler.store
        async with asyncio.timeout(60):
            while (
                not (rows := await asyncio.to_thread(store.deliveries, job_id))
                or any(r.status != "dead_letter" for r in rows)
                or "job.succeeded" not in {r.event_type for r in rows}
            ):
                await asyncio.sleep(0.05)
        listed = (await client.get("/v1/webhooks/deliveries", params={"status": "dead_letter"})).json()["data"]
        mine = [d for d in listed if d["job_id"] == job_id]
        assert {d["id"] for d in mine} == {r.id for r in rows}
        assert all(d["last_status_code"] == 410 and d["last_error"] == "http_status" for d in mine)
        # Another tenant sees none of them and cannot touch them.
        other = {"Authorization": f"Bearer {keys['globex']}"}
        theirs = (await client.get("/v1/webhooks/deliveries", headers=other)).json()["data"]
        assert not any(d["job_id"] == job_id for d in theirs)
        target = next(d for d in mine if d["event_type"] == "job.succeeded")
        refused = await client.post(f"/v1/webhooks/deliveries/{target['id']}/redeliver", headers=other)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "delivery_not_found"

        receiver.status = 204  # fixed: redeliver
        again = await client.post(f"/v1/webhooks/deliveries/{target['id']}/redeliver")
        assert again.status_code == 202 and again.json()["status"] == "pending"
        async with asyncio.timeout(30):
            while (await client.get(f"/v1/webhooks/deliveries/{target['id']}")).json()["status"] != "delivered":
                await asyncio.sleep(0.05)
        assert receiver.events[-1]["type"] == "job.succeeded" and receiver.ids[-1] == target["id"]
        # Pending (queued again, not yet attempted): a second redeliver is refused.
        assert (await client.post(f"/v1/webhooks/deliveries/{target['id']}/redeliver")).status_code == 202
        twice = await client.post(f"/v1/webhooks/deliveries/{target['id']}/redeliver")
        assert twice.status_code in (202, 409)  # 202 only if the dispatcher was quicker than us
        if twice.status_code == 409:
            assert twice.json()["error"]["code"] == "delivery_pending"


async def test_rotating_the_secret_signs_with_old_and_new(client: httpx.AsyncClient, keys, platform):
    headers = {"Authorization": f"Bearer {keys['globex']}"}
    old = (await client.get("/v1/webhooks/secret", headers=headers)).json()["data"][0]["secret"]
    rotated = await client.post("/v1/webhooks/secret/rotate", headers=headers)
    assert rotated.status_code == 200, rotated.text
    new, previous = rotated.json()["data"]
    assert previous["secret"] == old and previous["expires_at"] and new["secret"] != old
    assert new["generation"] == previous["generation"] + 1
    for secret in (new["secret"], old):
        with Receiver(secret, status=204) as receiver:
            response = await client.post(
                "/v1/jobs",
                json={"prompt": "rotated", "size": "64x64", "steps": 2, "webhook_url": receiver.url},
                headers=headers,
            )
            async with asyncio.timeout(60):
                while "job.succeeded" not in {e["type"] for e in receiver.events}:
                    await asyncio.sleep(0.05)
        assert response.status_code == 202
    events = await asyncio.to_thread(
        platform.services.audit.events, tenant_id="globex", action="webhook_secret.rotated"
    )
    assert events and events[0].details["generation"] == new["generation"]
