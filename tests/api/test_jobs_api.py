"""The native jobs API over HTTP (in-process ASGI): submit, poll, events, cancel, errors."""

from __future__ import annotations

import asyncio
import io
import json

import httpx

FAST = {"size": "64x64", "steps": 3}


async def wait_done(client: httpx.AsyncClient, job_id: str, timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            await asyncio.sleep(0.05)


async def test_submit_poll_and_download(client: httpx.AsyncClient):
    response = await client.post("/v1/jobs", json={"prompt": "a red fox", "n": 2, "seed": 5, **FAST})
    assert response.status_code == 202 and response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    assert len(response.headers["x-trace-id"]) == 32
    job = await wait_done(client, response.json()["id"])
    assert job["status"] == "succeeded" and [i["seed"] for i in job["images"]] == [5, 6]
    assert job["trace_id"] == response.headers["x-trace-id"]
    image = job["images"][0]
    assert image["timings"][0]["denoise_step_s"] and image["sha256"]
    png = httpx.get(image["url"]).content  # presigned S3 URL, straight from SeaweedFS
    assert png.startswith(b"\x89PNG")


async def test_any_multiple_of_16_runs_at_its_own_size_with_64_bit_seeds(client: httpx.AsyncClient):
    """A size outside the buckets runs as asked (never resized), batches with its own size only;
    a seed above 2**63 is stored and reported exactly; a ComfyUI schedule name is a parameter."""
    seed = 2**64 - 2
    body = {"prompt": "a red fox", "size": "96x160", "steps": 2, "n": 2, "seed": seed, "scheduler": "karras"}
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_done(client, response.json()["id"])
    assert job["status"] == "succeeded" and [i["seed"] for i in job["images"]] == [seed, seed + 1]
    assert job["params"]["size"] == "96x160" and job["params"]["scheduler"] == "karras"
    assert "png_text" not in job["params"]
    from PIL import Image

    with Image.open(io.BytesIO(httpx.get(job["images"][0]["url"]).content)) as png:
        assert png.size == (96, 160)
    too_big = await client.post("/v1/jobs", json={**body, "seed": 2**64 - 1})  # seed + 1 would pass 2**64 - 1
    assert too_big.status_code == 422 and too_big.json()["error"]["code"] == "seed_out_of_range"
    bad = await client.post("/v1/jobs", json={"prompt": "x", "size": "2048x4096"})
    error = bad.json()["error"]
    assert bad.status_code == 422 and error["code"] == "unsupported_size" and "1024x1024" in error["choices"]
    assert "multiples of 16 between 64 and 2048" in error["message"]


async def test_traceparent_is_honoured(client: httpx.AsyncClient):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await client.post(
        "/v1/jobs", json={"prompt": "x", **FAST}, headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    )
    assert response.headers["x-trace-id"] == trace and response.json()["trace_id"] == trace


async def test_idempotency_key(client: httpx.AsyncClient):
    body = {"prompt": "idempotent", **FAST}
    first = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-77"})
    again = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-77"})
    other = await client.post("/v1/jobs", json={**body, "seed": 1}, headers={"Idempotency-Key": "order-77"})
    assert first.status_code == 202 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"


async def test_sse_events_stream_to_the_terminal_event(client: httpx.AsyncClient):
    job_id = (await client.post("/v1/jobs", json={"prompt": "sse", **FAST})).json()["id"]
    events = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        name = None
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
                if name in ("succeeded", "failed", "cancelled"):
                    break
    names = [n for n, _ in events]
    assert names[0] in ("queued", "started") and names[-1] == "succeeded"
    progress = [d for n, d in events if n == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total"] == 3
    assert events[-1][1]["job"]["images"][0]["url"]


async def test_cancel_queued_and_running(client: httpx.AsyncClient):
    slow_body = {"variant": "base", "prompt": "slow", "size": "512x512", "steps": 50}
    slow = (await client.post("/v1/jobs", json=slow_body)).json()
    queued = (await client.post("/v1/jobs", json={"variant": "base", "prompt": "behind", "size": "128x128"})).json()
    cancelled = await client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["error"]["code"] == "cancelled_by_client"
    async with asyncio.timeout(30):
        while (await client.get(f"/v1/jobs/{slow['id']}")).json()["status"] != "running":
            await asyncio.sleep(0.01)
    await client.post(f"/v1/jobs/{slow['id']}/cancel")
    done = await wait_done(client, slow["id"])
    assert done["status"] == "cancelled" and done["images"][0]["url"] is None
    again = await client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


async def test_edit_with_an_uploaded_image_and_hires(client: httpx.AsyncClient):
    source = await wait_done(client, (await client.post("/v1/jobs", json={"prompt": "src", **FAST})).json()["id"])
    png = httpx.get(source["images"][0]["url"]).content
    files = {"image": ("in.png", png, "image/png")}
    data = {"request": json.dumps({"variant": "edit", "prompt": "make it night", "strength": 0.5, **FAST})}
    edit = await client.post("/v1/jobs", files=files, data=data)
    assert edit.status_code == 202, edit.text
    assert (await wait_done(client, edit.json()["id"]))["kind"] == "edit"
    hires = await client.post(
        "/v1/jobs",
        json={"prompt": "castle", "size": "128x128", "steps": 4, "hires": {"from_size": "64x64", "denoise": 0.5}},
    )
    job = await wait_done(client, hires.json()["id"])
    assert job["kind"] == "hires" and [t["pass"] for t in job["images"][0]["timings"]] == ["base", "hires"]


async def test_edit_from_an_s3_url_of_the_tenants_own_and_not_anothers(client: httpx.AsyncClient, keys):
    done = await wait_done(client, (await client.post("/v1/jobs", json={"prompt": "mine", **FAST})).json()["id"])
    key = done["images"][0]["url"].split("/results/", 1)[1].split("?", 1)[0]
    ok = await client.post(
        "/v1/jobs", json={"variant": "edit", "prompt": "x", "image_url": f"s3://results/{key}", **FAST}
    )
    assert ok.status_code == 202, ok.text
    other = await client.post(
        "/v1/jobs",
        json={"variant": "edit", "prompt": "x", "image_url": f"s3://results/{key}", **FAST},
        headers={"Authorization": f"Bearer {keys['globex']}"},
    )
    assert other.status_code == 422 and other.json()["error"]["code"] == "image_url_not_found"


async def test_bad_input_gets_a_reason_and_the_valid_choices(client: httpx.AsyncClient):
    cases = [
        ({"prompt": "x", "size": "1000x1000"}, 422, "unsupported_size", "size"),
        ({"prompt": "x", "sampler": "lms"}, 422, "unsupported_sampler", "sampler"),
        ({"prompt": "x", "variant": "ultra"}, 422, "unknown_variant", "variant"),
        ({"prompt": "x", "steps": 99}, 422, "steps_out_of_range", "steps"),
        ({"prompt": "x", "bogus": 1}, 422, "invalid_parameter", "bogus"),
        ({"prompt": ""}, 422, "prompt_empty", "prompt"),
        ({"variant": "edit", "prompt": "x"}, 422, "image_required", "image"),
        ({"prompt": "x", "webhook_url": "ftp://example.com/hook"}, 422, "webhook_url_invalid", "webhook_url"),
    ]
    for body, status, code, param in cases:
        response = await client.post("/v1/jobs", json=body)
        error = response.json()["error"]
        assert (response.status_code, error["code"], error["param"]) == (status, code, param), body
    bad = await client.post("/v1/jobs", json={"prompt": "x", "size": "1000x1000"})
    assert "1024x1024" in bad.json()["error"]["choices"]
    assert (await client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})).json()[
        "error"
    ]["code"] == "invalid_json"


async def test_upload_limits_and_decompression_bombs(client: httpx.AsyncClient):
    from pipeline.test_images import png_declaring

    files = {"image": ("bomb.png", png_declaring(50_000, 50_000), "image/png")}
    data = {"request": json.dumps({"variant": "edit", "prompt": "x", **FAST})}
    response = await client.post("/v1/jobs", files=files, data=data)
    assert response.status_code == 422 and response.json()["error"]["code"] == "image_too_many_pixels"
    files = {"image": ("x.gif", b"GIF89a" + b"\x00" * 100, "image/gif")}
    response = await client.post("/v1/jobs", files=files, data=data)
    assert response.json()["error"]["code"] in ("image_unreadable", "image_format_unsupported")
    huge = await client.post(
        "/v1/jobs", content=b"x" * (26 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"


async def test_auth_and_isolation(client: httpx.AsyncClient, keys):
    job_id = (await client.post("/v1/jobs", json={"prompt": "private", **FAST})).json()["id"]
    anonymous = await client.get(f"/v1/jobs/{job_id}", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"
    wrong = await client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer zk_000000000000_" + "a" * 43})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    other = {"X-API-Key": keys["globex"], "Authorization": ""}
    for method, path in [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ]:
        response = await client.request(method, path, headers=other)
        assert response.status_code == 404, path
    listing = await client.get("/v1/jobs", headers=other)
    assert job_id not in [j["id"] for j in listing.json()["data"]]


async def test_models_health_and_openapi(client: httpx.AsyncClient):
    models = (await client.get("/v1/models")).json()
    turbo = next(m for m in models["data"] if m["variant"] == "turbo")
    assert turbo["id"] == "z-image-turbo" and "1024x1024" in turbo["buckets"] and turbo["defaults"]["steps"] == 8
    assert "cpu" in models["pools"]
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["engines"] == "ok"
    spec = (await client.get("/openapi.json")).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/images/generations", "/v1/batches", "/v1/models"} <= set(
        spec["paths"]
    )


async def test_edit_from_an_http_url(client: httpx.AsyncClient):
    """The input image by URL: here the presigned URL of an earlier result (loopback is allowed in tests)."""
    done = await wait_done(client, (await client.post("/v1/jobs", json={"prompt": "src", **FAST})).json()["id"])
    edit = await client.post(
        "/v1/jobs", json={"variant": "edit", "prompt": "x", "image_url": done["images"][0]["url"], **FAST}
    )
    assert edit.status_code == 202, edit.text
    assert (await wait_done(client, edit.json()["id"]))["status"] == "succeeded"
    missing = done["images"][0]["url"].replace("/0.png", "/404.png")
    response = await client.post("/v1/jobs", json={"variant": "edit", "prompt": "x", "image_url": missing, **FAST})
    assert response.status_code == 422 and response.json()["error"]["code"] == "image_url_unreachable"


async def test_json_bodies_refuse_non_finite_numbers(client: httpx.AsyncClient):
    """Python's json reads NaN, Infinity and 1e999; JSON has none of them, and nothing stored with
    one could be sent back: every JSON body refuses them with one reason code."""
    json_type = {"Content-Type": "application/json"}
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = f'{{"prompt": "x", "guidance": {literal}, "size": "64x64", "steps": 3}}'
        for path in ("/v1/jobs", "/v1/images/generations"):
            answer = await client.post(path, content=body, headers=json_type)
            assert answer.status_code == 422, (path, literal, answer.text)
            assert answer.json()["error"]["code"] == "non_finite_number", (path, literal)
    multipart = {"image": ("in.png", b"\x89PNG", "image/png")}
    form = await client.post("/v1/jobs", files=multipart, data={"request": '{"prompt": "x", "shift": NaN}'})
    assert form.status_code == 422 and form.json()["error"]["code"] == "non_finite_number"
    malformed = await client.post("/v1/images/generations", content=b'{"prompt": ', headers=json_type)
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "invalid_parameter"
