"""The probes: ``/healthz`` answers while a handler waits on the job store, S3, Pillow or Redis
(that work runs in worker threads, never on the event loop every request shares), and the
unauthenticated ``/readyz`` says which check failed by reason code only."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from PIL import Image

FAST = {"size": "64x64", "steps": 3}


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 80, 120)).save(out, format="PNG")
    return out.getvalue()


async def finished_job(client: httpx.AsyncClient) -> dict:
    job = (await client.post("/v1/jobs", json={"prompt": "probe", **FAST})).json()
    async with asyncio.timeout(60):
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            await asyncio.sleep(0.05)
            job = (await client.get(f"/v1/jobs/{job['id']}")).json()
    return job


async def healthz_while_blocked(
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    target: object,
    name: str,
    request: Callable[[], Awaitable[httpx.Response]],
    blocks: Callable[..., bool] = lambda *args, **kwargs: True,
) -> httpx.Response:
    """Make ``target.name`` hang (for the calls ``blocks`` picks), send ``request``, and check
    /healthz answers before the hanging call is over: on the event loop it could not."""
    entered, release, over = threading.Event(), threading.Event(), threading.Event()
    original = getattr(target, name)

    def hanging(*args, **kwargs):
        if blocks(*args, **kwargs):
            entered.set()
            release.wait(10)
            over.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, hanging)
    pending = asyncio.create_task(request())
    try:
        async with asyncio.timeout(30):
            while not entered.is_set():
                await asyncio.sleep(0.01)
        assert (await client.get("/healthz")).status_code == 200
        assert not over.is_set(), f"/healthz waited for {name}"
    finally:
        release.set()
    response = await pending
    monkeypatch.setattr(target, name, original)
    return response


async def test_job_reads_run_off_the_event_loop(client: httpx.AsyncClient, platform, monkeypatch):
    job = await finished_job(client)
    store = platform.services.store
    mine = lambda job_id, *rest, **kw: job_id == job["id"]  # noqa: E731 (the scheduler reads other jobs)

    read = await healthz_while_blocked(
        client, monkeypatch, store, "get", lambda: client.get(f"/v1/jobs/{job['id']}"), mine
    )
    assert read.status_code == 200 and read.json()["status"] == "succeeded"
    listed = await healthz_while_blocked(client, monkeypatch, store, "list", lambda: client.get("/v1/jobs"))
    assert listed.status_code == 200 and job["id"] in [j["id"] for j in listed.json()["data"]]
    events = await healthz_while_blocked(
        client, monkeypatch, store, "get", lambda: client.get(f"/v1/jobs/{job['id']}/events"), mine
    )
    assert events.status_code == 200 and "event: succeeded" in events.text


async def test_input_images_are_decoded_and_stored_off_the_event_loop(client, platform, monkeypatch):
    results = platform.services.results
    inputs = lambda key, *rest, **kw: "/inputs/" in key  # noqa: E731 (engines store results meanwhile)
    files = {"image": ("in.png", png(), "image/png")}
    request = {"request": json.dumps({"variant": "edit", "prompt": "night", "strength": 0.5, **FAST})}
    job = await healthz_while_blocked(
        client, monkeypatch, results, "put_bytes", lambda: client.post("/v1/jobs", files=files, data=request), inputs
    )
    assert job.status_code == 202, job.text

    form = {"prompt": "night", "size": "64x64", "steps": "3", "strength": "0.5", "response_format": "b64_json"}
    edited = await healthz_while_blocked(
        client,
        monkeypatch,
        results,
        "put_bytes",
        lambda: client.post("/v1/images/edits", files=files, data=form),
        inputs,
    )
    assert edited.status_code == 200, edited.text

    source = await finished_job(client)
    key = next(i for i in (await client.get(f"/v1/jobs/{source['id']}")).json()["images"])["url"]
    s3_key = key.split("?")[0].split(f"/{results.bucket}/", 1)[1]
    by_url = {"variant": "edit", "prompt": "x", "image_url": f"s3://{results.bucket}/{s3_key}", **FAST}
    fetched = await healthz_while_blocked(
        client,
        monkeypatch,
        results,
        "get_bytes",
        lambda: client.post("/v1/jobs", json=by_url),
        lambda key, *rest, **kw: key == s3_key,
    )
    assert fetched.status_code == 202, fetched.text


async def test_submit_checks_its_rate_limit_off_the_event_loop(client, platform, monkeypatch, redis_url):
    """The images-per-minute check is a Redis round trip with the redis backend (on the memory
    backend it is an in-process count, done inline)."""
    from zimage_platform.tenancy.ratelimit import TenantRateLimiter

    shared = TenantRateLimiter("redis", redis_url=redis_url, key_prefix=f"zimage-probe-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(platform.services, "rate_limiter", shared)
    submitted = await healthz_while_blocked(
        client,
        monkeypatch,
        shared,
        "check_images",
        lambda: client.post("/v1/jobs", json={"prompt": "limits", **FAST}),
    )
    assert submitted.status_code == 202, submitted.text


async def test_readyz_says_what_failed_by_reason_only(client, platform, monkeypatch, caplog):
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "s3": "ok", "engines": "ok"}}

    def unreachable(*args, **kwargs):
        raise RuntimeError("could not connect to s3://secret-bucket with AKIASECRET")

    async def no_engines():
        return {"pools": {"cpu": {"min_replicas": 1, "engines": {"turbo": {"capacity": 0, "inflight": 0}}}}}

    monkeypatch.setattr(platform.services.results, "head", unreachable)
    monkeypatch.setattr(platform.services.scheduler, "status", no_engines)
    with caplog.at_level(logging.INFO, logger="zimage_platform.api.health.api_router"):
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "not_ready",
        "checks": {"database": "ok", "s3": "fail", "engines": "fail"},
        "reasons": {"s3": "s3_unreachable", "engines": "engines_not_loaded"},
    }
    assert "AKIASECRET" not in ready.text and "turbo" not in ready.text
    assert "AKIASECRET" in caplog.text and "['turbo']" in caplog.text  # the details are logged
