"""Webhook delivery through the outbox: retried until delivered or dead-lettered, redeliverable,
and one tenant's slow receiver never holds up another tenant's events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from webhook_receiver import Receiver, Step
from zimage_platform.db import create_db_engine, upgrade, utcnow
from zimage_platform.scheduling.deliveries import DeliveryNotFound, DeliveryOutbox, DeliveryPending, WebhookDispatcher
from zimage_platform.scheduling.store import JobStore, NewJob
from zimage_platform.scheduling.webhooks import Attempt, RetryPolicy, WebhookEvent, WebhookSender, generate_secret

SECRETS = {"acme": generate_secret(), "globex": generate_secret()}
PARAMS = {"prompt": "a cat", "size": "64x64", "steps": 2, "guidance": 0.0, "sampler": "euler", "shift": 3.0}


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    server = Receiver(SECRETS["acme"]).start()
    yield server
    server.stop()


@pytest.fixture
def receiver(receiver_server: Receiver) -> Receiver:
    return receiver_server.reset()


@pytest.fixture
def store(database_url: str) -> JobStore:
    return JobStore(create_db_engine(database_url))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> JobStore:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine)
    return JobStore(engine)


def queue(outbox: DeliveryOutbox, url: str, tenant: str = "acme", type_: str = "job.succeeded", **data) -> str:
    """A job of ``tenant`` and one webhook event of it in the outbox (as the notifier writes it)."""
    job, _ = outbox.store.create(
        NewJob(tenant_id=tenant, variant="turbo", kind="text2img", params=PARAMS, seeds=[1], webhook_url=url)
    )
    event = WebhookEvent(type=type_, job_id=job.id, tenant_id=tenant, data=data)
    outbox.add(outbox.row_for(event, url))
    return event.id


def dispatcher(outbox: DeliveryOutbox, **options) -> WebhookDispatcher:
    settings = {"per_tenant": 4, "poll_s": 0.02, "policy": RetryPolicy(backoff_s=0.02, jitter=0.0, max_age_s=60)}
    settings.update(options)
    sender = WebhookSender(allow_private=True, timeout_s=settings.pop("timeout_s", 2.0))
    return WebhookDispatcher(outbox, sender, lambda tenant: [SECRETS[tenant]], **settings)


async def until(check, timeout_s: float = 15.0):
    async with asyncio.timeout(timeout_s):
        while not (found := await asyncio.to_thread(check)):
            await asyncio.sleep(0.02)
    return found


def status_of(outbox: DeliveryOutbox, tenant: str, event_id: str) -> str:
    return outbox.get(tenant, event_id).status


# -- the outbox's states (SQLite and PostgreSQL) -------------------------------------------------


def test_a_claim_is_exclusive_and_lapses(store: JobStore):
    outbox = DeliveryOutbox(store)
    event_id = queue(outbox, "http://127.0.0.1:9/hook")
    now = utcnow()
    assert [r.id for r in outbox.due(now)] == [event_id]
    assert outbox.claim(event_id, now, now + timedelta(seconds=30))
    assert not outbox.claim(event_id, now, now + timedelta(seconds=30))  # another dispatcher: no
    assert outbox.due(now) == []
    later = now + timedelta(seconds=31)  # the claimer died mid-attempt: the row is due again
    assert [r.id for r in outbox.due(later)] == [event_id] and outbox.claim(event_id, later, later)


def test_due_leaves_out_tenants_with_no_room(store: JobStore):
    outbox = DeliveryOutbox(store)
    mine = [queue(outbox, "http://127.0.0.1:9/a", "acme") for _ in range(3)]
    theirs = queue(outbox, "http://127.0.0.1:9/b", "globex")
    now = utcnow()
    assert [r.id for r in outbox.due(now, limit=3)] == mine
    assert [r.id for r in outbox.due(now, exclude_tenants=["acme"], limit=3)] == [theirs]


def test_outcomes_and_redelivery(store: JobStore):
    outbox = DeliveryOutbox(store, max_age_s=60)
    event_id = queue(outbox, "http://127.0.0.1:9/hook")
    now = utcnow()
    assert outbox.record(event_id, Attempt(503, "http_status"), now, now + timedelta(seconds=5)) == "pending"
    assert outbox.record(event_id, Attempt(None, "timeout"), now, None) == "dead_letter"
    row = outbox.get("acme", event_id)
    assert (row.attempts, row.last_status_code, row.last_error) == (2, None, "timeout")
    assert [r.id for r in outbox.of_tenant("acme", status="dead_letter")] == [event_id]
    assert outbox.of_tenant("globex") == []
    with pytest.raises(DeliveryNotFound):  # another tenant's delivery does not exist for them
        outbox.redeliver("globex", event_id)
    again = outbox.redeliver("acme", event_id, now)
    assert again.status == "pending" and again.attempts == 0 and again.next_attempt_at is None
    assert again.give_up_at == now + timedelta(seconds=60) and again.id == event_id
    with pytest.raises(DeliveryPending):
        outbox.redeliver("acme", event_id)


# -- the dispatcher -------------------------------------------------------------------------------


async def test_retried_until_delivered_under_one_webhook_id(sqlite_store: JobStore, receiver: Receiver):
    outbox = DeliveryOutbox(sqlite_store)
    event_id = queue(outbox, receiver.url("flaky", Step(503), Step(500), Step(204)))
    d = dispatcher(outbox)
    await d.start()
    try:
        await until(lambda: status_of(outbox, "acme", event_id) == "delivered")
    finally:
        await d.stop()
    calls = receiver.calls_to("flaky")
    assert [c.headers["webhook-id"] for c in calls] == [event_id] * 3 and all(c.verified for c in calls)
    row = outbox.get("acme", event_id)
    assert (row.attempts, row.last_status_code, row.last_error, row.next_attempt_at) == (3, 204, None, None)


async def test_a_refusal_is_a_dead_letter_at_once_and_can_be_redelivered(sqlite_store: JobStore, receiver: Receiver):
    outbox = DeliveryOutbox(sqlite_store)
    url = receiver.url("gone", Step(410))
    event_id = queue(outbox, url)
    d = dispatcher(outbox)
    await d.start()
    try:
        await until(lambda: status_of(outbox, "acme", event_id) == "dead_letter")
        row = outbox.get("acme", event_id)
        assert (row.attempts, row.last_status_code, row.last_error) == (1, 410, "http_status")
        receiver.url("gone", Step(200))  # the tenant fixed its receiver
        outbox.redeliver("acme", event_id)
        await until(lambda: status_of(outbox, "acme", event_id) == "delivered")
    finally:
        await d.stop()
    assert [c.headers["webhook-id"] for c in receiver.calls_to("gone")] == [event_id] * 2


async def test_still_failing_at_the_maximum_age_is_a_dead_letter(sqlite_store: JobStore, receiver: Receiver):
    outbox = DeliveryOutbox(sqlite_store, max_age_s=1.0)
    event_id = queue(outbox, receiver.url("down", Step(503)))
    d = dispatcher(outbox, policy=RetryPolicy(backoff_s=0.05, jitter=0.0, max_age_s=1.0))
    await d.start()
    try:
        await until(lambda: status_of(outbox, "acme", event_id) == "dead_letter")
    finally:
        await d.stop()
    row = outbox.get("acme", event_id)
    assert row.attempts == len(receiver.calls_to("down")) >= 2  # retried (how often: machine load)
    assert row.last_error == "http_status" and row.last_status_code == 503


async def test_a_restart_resumes_pending_and_abandoned_deliveries(sqlite_store: JobStore, receiver: Receiver):
    outbox = DeliveryOutbox(sqlite_store)
    waiting = queue(outbox, receiver.url("a"))
    abandoned = queue(outbox, receiver.url("b"))
    now = utcnow()
    assert outbox.claim(abandoned, now, now + timedelta(seconds=0.3))  # its replica died mid-attempt
    d = dispatcher(outbox)
    await d.start()
    try:
        for event_id in (waiting, abandoned):
            await until(lambda event_id=event_id: status_of(outbox, "acme", event_id) == "delivered")
    finally:
        await d.stop()
    assert len(receiver.calls_to("a")) == len(receiver.calls_to("b")) == 1


async def test_a_slow_receiver_delays_only_its_own_tenant(sqlite_store: JobStore, receiver: Receiver):
    """globex's receiver takes 1 s per event and has 12 queued first; acme's event still goes out
    at once, and globex never has more than its cap in flight."""
    outbox = DeliveryOutbox(sqlite_store)
    receiver.secrets["slow"] = SECRETS["globex"]
    slow = [queue(outbox, receiver.url("slow", Step(200, delay_s=1.0)), "globex") for _ in range(12)]
    fast = queue(outbox, receiver.url("fast"), "acme")
    d = dispatcher(outbox, per_tenant=2, batch=5)
    started = time.monotonic()
    await d.start()
    try:
        await until(lambda: status_of(outbox, "acme", fast) == "delivered", timeout_s=5)
        fast_s = time.monotonic() - started
        pending = [e for e in slow if status_of(outbox, "globex", e) == "pending"]
        assert fast_s < 0.9 and len(pending) >= 8, (fast_s, len(pending))
        await until(lambda: all(status_of(outbox, "globex", e) == "delivered" for e in slow), timeout_s=30)
    finally:
        await d.stop()
    assert receiver.max_inflight["slow"] == 2
    assert all(c.verified for c in receiver.calls)  # each tenant's events signed with its own secret


async def test_a_tenant_secret_that_cannot_be_read_is_retried(sqlite_store: JobStore, receiver: Receiver):
    outbox = DeliveryOutbox(sqlite_store)
    event_id = queue(outbox, receiver.url("ok"))
    broken = {"yes": True}

    def secrets(tenant: str) -> list[str]:
        if broken["yes"]:
            raise ValueError("webhook secret env:ACME_SECRET is empty or missing")
        return [SECRETS[tenant]]

    d = WebhookDispatcher(
        outbox, WebhookSender(allow_private=True), secrets, poll_s=0.02, policy=RetryPolicy(backoff_s=0.05)
    )
    await d.start()
    try:
        await until(lambda: outbox.get("acme", event_id).last_error == "secret_unavailable")
        assert receiver.calls == []
        broken["yes"] = False  # the operator fixed the secret
        await until(lambda: status_of(outbox, "acme", event_id) == "delivered")
    finally:
        await d.stop()
