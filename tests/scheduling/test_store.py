"""The job store on SQLite and on a real PostgreSQL: state machine, idempotency, leases, recovery."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from zimage_platform.db import create_db_engine, utcnow
from zimage_platform.scheduling.store import (
    IdempotencyConflict,
    JobFinished,
    JobNotFound,
    JobStore,
    NewJob,
    StoredImage,
)

PARAMS = {"prompt": "a cat", "size": "64x64", "steps": 2, "guidance": 0.0, "sampler": "euler", "shift": 3.0}


@pytest.fixture
def store(database_url: str) -> JobStore:
    return JobStore(create_db_engine(database_url))


def new(tenant: str = "acme", n: int = 2, **kw) -> NewJob:
    return NewJob(tenant_id=tenant, variant="turbo", kind="text2img", params=PARAMS, seeds=list(range(7, 7 + n)), **kw)


def image(i: int) -> StoredImage:
    return StoredImage(s3_key=f"k/{i}.png", sha256="ab" * 32, size_bytes=100, timings=[], batch_size=2, engine_s=0.5)


def test_a_job_is_written_with_its_images_before_anything_runs(store: JobStore):
    row, created = store.create(new(n=3))
    assert created and row.status == "queued" and row.n == 3
    assert [(i.index, i.seed, i.status) for i in row.images] == [
        (0, 7, "pending"),
        (1, 8, "pending"),
        (2, 9, "pending"),
    ]
    assert store.queued()[0].id == row.id


def test_another_tenants_job_is_absent(store: JobStore):
    row, _ = store.create(new("acme"))
    with pytest.raises(JobNotFound):
        store.get(row.id, "globex")
    assert store.get(row.id, "acme").id == row.id
    assert store.list("globex") == [] and [j.id for j in store.list("acme")] == [row.id]


def test_idempotency_same_body_same_job_other_body_conflict(store: JobStore):
    first, created = store.create(new(idempotency_key="k1", request_hash="h1"))
    again, created_again = store.create(new(idempotency_key="k1", request_hash="h1"))
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict) as err:
        store.create(new(idempotency_key="k1", request_hash="h2"))
    assert err.value.status == 409
    other_tenant, created = store.create(new("globex", idempotency_key="k1", request_hash="h2"))
    assert created and other_tenant.id != first.id


def test_state_machine_claim_record_finish(store: JobStore):
    row, _ = store.create(new())
    claimed = store.claim(row.id, "sched-a", lease_s=30)
    assert claimed.status == "running" and claimed.attempts == 1 and claimed.lease_owner == "sched-a"
    assert store.record_image(row.id, 0, image(0)) is True
    assert store.record_image(row.id, 0, image(0)) is False  # idempotent
    assert store.pending_indexes(row.id) == [1]
    done = store.finish(row.id, "failed", code="engine_failed", message="boom")
    assert done.status == "failed" and done.error_code == "engine_failed" and done.finished_at is not None
    assert [i.status for i in done.images] == ["done", "failed"]
    assert store.finish(row.id, "succeeded").status == "failed"  # terminal stays terminal
    assert store.claim(row.id, "sched-a", lease_s=30) is None


def test_cancel_queued_now_running_flagged_finished_refused(store: JobStore):
    queued, _ = store.create(new())
    cancelled = store.request_cancel(queued.id, "acme")
    assert cancelled.status == "cancelled" and cancelled.error_code == "cancelled_by_client"
    assert all(i.status == "cancelled" for i in cancelled.images)
    running, _ = store.create(new())
    store.claim(running.id, "s", lease_s=30)
    flagged = store.request_cancel(running.id, "acme")
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.cancel_requested([running.id, queued.id]) == {running.id, queued.id}
    with pytest.raises(JobFinished):
        store.request_cancel(queued.id, "acme")
    with pytest.raises(JobNotFound):
        store.request_cancel(running.id, "globex")


def test_expired_leases_go_back_to_the_queue_keeping_done_images(store: JobStore):
    row, _ = store.create(new())
    store.claim(row.id, "dead-replica", lease_s=0.01)
    store.record_image(row.id, 0, image(0))
    requeued = store.requeue_expired(utcnow() + timedelta(seconds=1))
    assert [r.id for r in requeued] == [row.id]
    again = store.get(row.id)
    assert again.status == "queued" and again.lease_owner is None
    assert [i.status for i in again.images] == ["done", "pending"]
    assert store.claim(row.id, "new-owner", lease_s=30).attempts == 2


def test_renewed_leases_do_not_expire(store: JobStore):
    row, _ = store.create(new())
    store.claim(row.id, "me", lease_s=1)
    store.renew([row.id], "me", lease_s=600)
    assert store.requeue_expired(utcnow() + timedelta(seconds=5)) == []
    store.renew([row.id], "someone-else", lease_s=0)  # only the owner renews
    assert store.get(row.id).lease_expires_at > utcnow() + timedelta(seconds=500)


def test_queue_deadlines_fail_with_a_reason(store: JobStore):
    late, _ = store.create(new(deadline_at=utcnow() - timedelta(seconds=1)))
    fine, _ = store.create(new(deadline_at=utcnow() + timedelta(hours=1)))
    failed = store.expire_deadlines()
    assert [f.id for f in failed] == [late.id] and failed[0].error_code == "queue_timeout"
    assert store.get(fine.id).status == "queued"


def test_seeds_span_64_bits_exactly(store: JobStore):
    """ComfyUI's seeds reach 2**64 − 1; the signed BIGINT column holds them two's-complement."""
    seeds = [0, 2**32 - 1, 2**63 - 1, 2**63, 677498465340151, 2**64 - 1]
    row, _ = store.create(NewJob(tenant_id="a", variant="turbo", kind="text2img", params=PARAMS, seeds=seeds))
    assert [i.seed for i in store.get(row.id).images] == seeds
    with store.engine.connect() as conn:  # what a raw SQL reader sees
        query = text('SELECT seed FROM job_images WHERE job_id = :job ORDER BY "index"')
        raw = [r[0] for r in conn.execute(query, {"job": row.id})]
    assert raw == [0, 2**32 - 1, 2**63 - 1, -(2**63), 677498465340151, -1]
