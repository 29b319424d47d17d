"""The fault drills' machinery on tiny synthetic cases (the drills themselves are a benchmark:
``python -m bench drills``): the invariant checker, recovery times, the report, the webhook
receiver's failure modes, and the private Redis and PostgreSQL the drills stop and restart."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest
from bench.drills import (
    Ack,
    DrillResult,
    Fault,
    JobState,
    Observation,
    WebhookReceiver,
    check,
    image_of_key,
    markdown,
    recovery,
)
from bench.services import PG_BIN, PrivatePostgres, PrivateRedis, answers

DAY = "tenants/drill-x/2026/12/03"


def clean_case() -> Observation:
    """Two jobs (one async with a webhook, two images; one sync), all delivered, billed, stored."""
    return Observation(
        accepted=["job_a", "job_s"],
        jobs={
            "job_a": JobState("succeeded", 1, True, 100.0),
            "job_s": JobState("succeeded", 1, False, 101.0),
        },
        images_done=[("job_a", 0), ("job_a", 1), ("job_s", 0)],
        ledger=[("job_a", 0), ("job_a", 1), ("job_s", 0)],
        s3_keys=[f"{DAY}/job_a/0.png", f"{DAY}/job_a/1.png", f"{DAY}/job_s/0.png", f"{DAY}/batches/b/manifest.csv"],
        acks=[Ack("evt_1", "job.started", "job_a", 99.0), Ack("evt_2", "job.succeeded", "job_a", 100.5)],
        audit=[],
    )


def verdicts(obs: Observation) -> dict[str, tuple[bool, str, list[str]]]:
    return {i.name: (i.ok, i.value, i.detail) for i in check(obs)}


def test_a_clean_drill_passes_every_invariant():
    found = verdicts(clean_case())
    assert all(ok for ok, _, _ in found.values()), found
    assert found["ledger=s3=delivered"][1] == "3 / 3 / 3"  # the manifest is no image
    assert found["webhooks"][1] == "1/1"
    assert "orphans" not in found  # only judged where a platform was killed


def test_each_broken_invariant_is_reported_with_the_ids():
    obs = clean_case()
    obs.accepted.append("job_lost")
    obs.jobs["job_lost"] = JobState("failed", 3, True, 102.0, "engine_failed")
    obs.jobs["job_open"] = JobState("queued", 0, False, None)
    obs.ledger.append(("job_a", 1))  # billed twice
    obs.s3_keys.append(f"{DAY}/job_open/0.png")  # stored, never billed
    obs.audit.append("object_missing: job_a/1 s3 key gone")
    obs.orphans = ["weed (pid 42)"]
    obs.refused = {"503 database_unavailable": 3, "sync 500 internal_error": 2, "ConnectError": 4, "502": 1}

    found = verdicts(obs)

    assert found["lost"] == (False, "1", ["job_lost (failed)"])
    assert found["stuck"] == (False, "1", ["job_open (queued)"])
    assert found["double_billed"] == (False, "1", ["job_a/1 ×2"])
    ok, value, detail = found["ledger=s3=delivered"]
    assert not ok and value == "4 / 4 / 3"
    assert "job_open/0 in S3, not billed" in detail
    # job_lost ended failed and asked for webhooks: its job.failed was never acknowledged.
    assert found["webhooks"] == (False, "1/2", ["job_lost (job.failed)"])
    assert found["audit"][0] is False
    assert found["orphans"] == (False, "1", ["weed (pid 42)"])
    # A 503 that names its cause is fine; a 500 internal_error or a bare 502 is not.
    assert found["unexplained_5xx"] == (False, "3", ["sync 500 internal_error ×2", "502 ×1"])


def test_an_accepted_job_without_a_row_is_lost():
    obs = clean_case()
    obs.accepted.append("job_gone")
    assert verdicts(obs)["lost"] == (False, "1", ["job_gone (no job row)"])


def test_image_keys_map_to_job_and_index():
    assert image_of_key(f"{DAY}/job_a/12.png") == ("job_a", 12)
    assert image_of_key(f"{DAY}/batches/b/manifest.csv") is None
    assert image_of_key("x.png") is None


def test_recovery_counts_from_the_faults_end():
    jobs = {"a": JobState("succeeded", 1, True, 130.0), "b": JobState("succeeded", 1, False, 125.0)}
    acks = [Ack("e1", "job.succeeded", "a", 140.0), Ack("e2", "job.progress", "a", 150.0)]
    fault = Fault(100.0, 110.0)
    assert recovery([105.0, 118.0, 125.0], acks, jobs, fault, "image") == (8.0, 30.0)
    assert recovery([105.0], acks, jobs, fault, "webhook") == (30.0, 30.0)
    jobs["c"] = JobState("running", 1, False, None)
    assert recovery([118.0], acks, jobs, fault, "image") == (8.0, None)  # not drained


def test_the_report_renders_from_the_json():
    result = DrillResult("engine-kill", "engine replica SIGKILLed mid-batch", 0.0, Fault(1.0, 1.0, {"pid": 7}))
    result.invariants = check(clean_case())
    result.load = {"sent": 10, "accepted_async": 7, "accepted_sync": 2, "refused": {"sync 503 unavailable": 1}}
    result.recovery_s, result.drain_s = 4.2, 9.0
    failed = DrillResult("redis-down", "Redis down", 0.0, error="RuntimeError: boom")
    meta = {"date": "today", "command": "python -m bench drills", "source": "abc", "engine": {"backend": "onnxruntime"}}
    data = {"meta": meta | {"load": "light"}, "drills": [result.to_json(), failed.to_json()]}

    text = markdown(data)

    assert "| engine-kill | engine replica SIGKILLed mid-batch | 7+2 | 0 | 0 | 0 | 3 / 3 / 3 | 1/1 | 0 | 0 |" in text
    assert "**PASS**" in text and "**ERROR**" in text and "RuntimeError: boom" in text
    assert DrillResult.from_json(result.to_json()).verdict == "PASS"
    result.load["drained"] = False  # a terminal webhook never acknowledged: no drain time to show
    assert "| 4.2 s | n/a |" in markdown({"meta": data["meta"], "drills": [result.to_json()]})


def test_the_receiver_acknowledges_refuses_and_hangs_on_demand():
    receiver = WebhookReceiver(slow_s=0.05).start()
    event = {"type": "job.succeeded", "data": {"job_id": "job_a"}}
    try:
        post = lambda: httpx.post(receiver.url, json=event, headers={"webhook-id": "evt_1"}, timeout=5)  # noqa: E731
        assert post().status_code == 200
        receiver.set_mode("down")
        assert post().status_code == 503
        receiver.set_mode("slow")
        assert post().status_code == 200
        receiver.set_mode("hang")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(receiver.url, json=event, timeout=0.3)
        answered: list[int] = []
        waiting = threading.Thread(target=lambda: answered.append(post().status_code))
        waiting.start()
        receiver.set_mode("up")  # a hanging request is let go (unacknowledged) when the mode changes
        waiting.join(timeout=5)
        assert answered and answered[0] in (200, 503)
    finally:
        receiver.stop()
    assert [a.type for a in receiver.acks][:2] == ["job.succeeded", "job.succeeded"]
    assert receiver.refused["down"] == 1 and receiver.refused["hang"] >= 1


@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server is not installed")
def test_a_private_redis_comes_back_on_its_port():
    with PrivateRedis() as redis:
        redis.stop()
        assert not answers("127.0.0.1", redis.port)
        redis.start()
        assert answers("127.0.0.1", redis.port)
    assert not answers("127.0.0.1", redis.port)


@pytest.mark.skipif(not (PG_BIN / "initdb").exists() and not shutil.which("initdb"), reason="no PostgreSQL binaries")
def test_a_private_postgres_restarts_with_its_data():
    import psycopg

    with PrivatePostgres() as postgres:
        url = postgres.create_database("drill")
        conninfo = f"host=127.0.0.1 port={postgres.port} user=postgres dbname=drill"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
        postgres.stop()
        assert not answers("127.0.0.1", postgres.port)
        postgres.start()
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert url.endswith(f":{postgres.port}/drill")
    assert not postgres.root.exists()
