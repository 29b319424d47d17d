"""Webhooks through Ray Serve: the ingress shows a tenant the secret the scheduler (another
process) signs its events with, and a refused event is a dead letter the tenant redelivers."""

from __future__ import annotations

import time

import httpx

from webhook_receiver import Receiver, Step


def wait_for(check, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


def test_webhooks_signed_per_tenant_dead_lettered_and_redelivered(serve_app, serve_keys):
    acme = {"Authorization": f"Bearer {serve_keys['acme']}"}
    secret = httpx.get(f"{serve_app}/v1/webhooks/secret", headers=acme).json()["data"][0]["secret"]
    globex = httpx.get(f"{serve_app}/v1/webhooks/secret", headers={"X-API-Key": serve_keys["globex"]}).json()
    assert globex["data"][0]["secret"] != secret
    receiver = Receiver(secret).start()
    try:
        url = receiver.url("hook", Step(404))
        job = httpx.post(
            f"{serve_app}/v1/jobs",
            json={"prompt": "hooked through serve", "size": "64x64", "steps": 2, "webhook_url": url},
            headers=acme,
        ).json()

        def dead_letters() -> list[dict]:
            listed = httpx.get(
                f"{serve_app}/v1/webhooks/deliveries", params={"status": "dead_letter"}, headers=acme
            ).json()["data"]
            found = [d for d in listed if d["job_id"] == job["id"] and d["event_type"] == "job.succeeded"]
            return found

        (dead,) = wait_for(dead_letters)
        assert dead["last_status_code"] == 404 and dead["last_error"] == "http_status"
        assert all(call.verified for call in receiver.calls)  # signed with the secret acme reads
        receiver.url("hook", Step(204))
        assert httpx.post(f"{serve_app}/v1/webhooks/deliveries/{dead['id']}/redeliver", headers=acme).status_code == 202
        wait_for(
            lambda: (
                httpx.get(f"{serve_app}/v1/webhooks/deliveries/{dead['id']}", headers=acme).json()["status"]
                == "delivered"
            )
        )
        assert [c.headers["webhook-id"] for c in receiver.calls_to("hook")].count(dead["id"]) == 2
    finally:
        receiver.stop()
