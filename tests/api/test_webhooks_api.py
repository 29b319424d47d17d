"""Job webhooks end to end: a local receiver verifies Standard Webhooks signatures."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from datetime import datetime

import httpx
import pytest
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class Receiver:
    """A real HTTP server on loopback that fails the first delivery of each event once."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.events: list[dict] = []
        self.ids: list[str] = []
        self.seen_once: set[str] = set()

        async def hook(request: Request) -> Response:
            body = await request.body()
            Webhook(self.secret).verify(body, dict(request.headers))
            event_id = request.headers["webhook-id"]
            self.ids.append(event_id)
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


@pytest.fixture(scope="module")
def secret(platform, api_config) -> str:
    return (api_config.paths.data_dir / "secrets" / "webhook-secret").read_text().strip()


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
