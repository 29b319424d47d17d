"""The Ray Serve application over real HTTP: the openai client, jobs, SSE, the Ray CLI path,
and an engine replica dying mid-batch."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from services import wait_http_ready as wait_ready
from zimage_platform.serve.builder import engine_deployment_name


@pytest.fixture(scope="module")
def client(serve_app, serve_keys) -> openai.OpenAI:
    """The official client, changed only in base_url and api_key."""
    return openai.OpenAI(base_url=f"{serve_app}/v1", api_key=serve_keys["acme"])


def test_openai_client_generates_urls_and_b64(client: openai.OpenAI):
    result = client.images.generate(model="z-image-turbo", prompt="a red fox in fresh snow", n=2, size="64x64")
    assert len(result.data) == 2
    png = httpx.get(result.data[0].url).content
    assert png.startswith(b"\x89PNG")
    b64 = client.images.generate(
        model="z-image-turbo",
        prompt="一只小猫",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 7, "steps": 4},
    )
    assert base64.b64decode(b64.data[0].b64_json).startswith(b"\x89PNG")


def test_openai_client_sees_typed_errors_with_codes(client: openai.OpenAI):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.generate(model="z-image-turbo", prompt="x", size="1000x1000")
    assert err.value.code == "unsupported_size" and "1024x1024" in err.value.body["choices"]
    with pytest.raises(openai.NotFoundError) as err:
        client.images.generate(model="dall-e-3", prompt="x")
    assert err.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=client.base_url, api_key="zk_000000000000_" + "b" * 43)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="x")


def test_openai_models_and_edits(client: openai.OpenAI):
    models = {m.id for m in client.models.list()}
    assert {"z-image-turbo", "z-image-base", "z-image-edit"} <= models
    source = httpx.get(client.images.generate(prompt="source", size="64x64").data[0].url).content
    edited = client.images.edit(
        model="z-image-edit",
        image=("in.png", source, "image/png"),
        prompt="make it night",
        size="64x64",
        extra_body={"steps": 4, "strength": "0.5"},
    )
    assert httpx.get(edited.data[0].url).content.startswith(b"\x89PNG")


def test_async_job_with_sse_over_real_http(serve_app, serve_keys):
    headers = {"Authorization": f"Bearer {serve_keys['acme']}"}
    job = httpx.post(
        f"{serve_app}/v1/jobs", json={"prompt": "sse over serve", "size": "64x64", "steps": 4}, headers=headers
    ).json()
    names = []
    with httpx.stream("GET", f"{serve_app}/v1/jobs/{job['id']}/events", headers=headers, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                names.append(line.split(":", 1)[1].strip())
                if names[-1] in ("succeeded", "failed", "cancelled"):
                    break
    assert names[-1] == "succeeded" and "progress" in names
    other = httpx.get(f"{serve_app}/v1/jobs/{job['id']}", headers={"X-API-Key": serve_keys["globex"]})
    assert other.status_code == 404


async def test_typed_errors_cross_the_scheduler_handle_as_themselves(serve_app, serve_config):
    """The scheduler deployment's expected errors reach the ingress as their own classes
    (JobNotFound, not a bare PlatformError), so its ``except JobNotFound`` handlers work."""
    from ray import serve

    from zimage_platform.scheduling.store import JobNotFound
    from zimage_platform.serve.deployments import RaySchedulerClient

    handle = serve.get_deployment_handle("Scheduler", app_name=serve_config.serve.app_name)
    with pytest.raises(JobNotFound) as raised:
        await RaySchedulerClient(handle).cancel("job_that_does_not_exist", "acme")
    assert type(raised.value) is JobNotFound and raised.value.param == "job_id"


def test_a_bulk_batch_and_an_idempotent_replay_over_ray(serve_app, serve_keys):
    """The batch row travels to the scheduler deployment with its jobs (one transaction there);
    a replay with the same Idempotency-Key answers the same batch, and it completes."""
    headers = {"Authorization": f"Bearer {serve_keys['acme']}", "Idempotency-Key": "serve-batch-1"}
    files = {"file": ("rows.csv", b"product\nmug\ncup\n", "text/csv")}
    request = {"request": json.dumps({"template": "a {product}", "defaults": {"size": "64x64", "steps": 2}})}
    first = httpx.post(f"{serve_app}/v1/batches", files=files, data=request, headers=headers, timeout=60)
    again = httpx.post(f"{serve_app}/v1/batches", files=files, data=request, headers=headers, timeout=60)
    assert first.status_code == 202 and again.status_code == 200, again.text
    batch = again.json()
    assert batch["id"] == first.json()["id"] and batch["total_rows"] == 2
    deadline = time.monotonic() + 120
    while batch["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = httpx.get(f"{serve_app}/v1/batches/{batch['id']}", headers=headers).json()
    assert batch["counts"]["succeeded"] == 2


def test_the_ray_cli_runs_the_same_builder_from_a_serve_config(
    serve_app, serve_config, serve_keys, ray_cluster, tmp_path
):
    """``serve run`` with a Serve config file (what the Helm chart renders), the config inline."""
    from ray import serve

    from zimage_platform.serve.builder import absolute_paths

    platform = absolute_paths(serve_config).model_dump(mode="json")
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text(
        yaml.safe_dump(
            {
                "applications": [
                    {
                        "name": "cli",
                        "route_prefix": "/cli",
                        "import_path": "zimage_platform.serve.builder:app_builder",
                        "args": {"config": platform},
                    }
                ],
            }
        )
    )
    address = ray_cluster.get_runtime_context().gcs_address
    run = subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "run", "--non-blocking", "-a", address, str(serve_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0 and "No module named ray.serve.scripts" in run.stderr:
        run = subprocess.run(
            [str(sys.executable).replace("python", "serve"), "run", "--non-blocking", "-a", address, str(serve_file)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr[-2000:]
    try:
        url = f"{serve_app}/cli"
        wait_ready(url)
        response = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "from the cli", "size": "64x64"},
            headers={"Authorization": f"Bearer {serve_keys['acme']}"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
    finally:
        serve.delete("cli")


def test_a_replica_dying_mid_batch_loses_nothing(serve_app, serve_keys, ray_cluster):
    """Kill the engine replica running a job: the batch is retried on its replacement and succeeds."""
    from ray import serve

    headers = {"Authorization": f"Bearer {serve_keys['acme']}"}
    job = httpx.post(
        f"{serve_app}/v1/jobs", json={"prompt": "survive", "size": "512x512", "steps": 16}, headers=headers
    ).json()
    deadline = time.monotonic() + 60
    while httpx.get(f"{serve_app}/v1/jobs/{job['id']}", headers=headers).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    name = engine_deployment_name("turbo", "cpu")
    status = serve.status().applications["zimage"].deployments[name]
    assert status.replica_states.get("RUNNING") == 1
    for actor in ray_cluster.util.list_named_actors(all_namespaces=True):
        if name in actor["name"] and "SERVE_REPLICA" in actor["name"]:
            ray_cluster.kill(ray_cluster.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    deadline = time.monotonic() + 240
    while (done := httpx.get(f"{serve_app}/v1/jobs/{job['id']}", headers=headers).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, done
        time.sleep(0.5)
    assert done["status"] == "succeeded", json.dumps(done)[:1000]
    assert done["images"][0]["url"]


def test_two_ingress_replicas_share_one_rate_limit_through_redis(
    serve_app, serve_config, ray_cluster, redis_url, tmp_path
):
    """A second app with 2 ingress replicas on the Redis backend: concurrent requests spread over
    both replicas, and the tenant still gets exactly its limit (memory stores would allow 2x)."""
    import concurrent.futures
    import uuid

    from ray import serve

    from tenants import add_tenant
    from zimage_platform.config import PoolConfig
    from zimage_platform.serve.builder import build_app

    cfg = serve_config.model_copy(
        update={
            "serve": serve_config.serve.model_copy(update={"app_name": "limits", "ingress_replicas": 2}),
            "tenancy": serve_config.tenancy.model_copy(
                update={
                    "rate_limit_backend": "redis",
                    "redis_url": redis_url,
                    "redis_prefix": f"zimage-{uuid.uuid4().hex[:8]}",
                    "dirs": [tmp_path / "tenants"],
                }
            ),
            "pools": {"cpu": PoolConfig(num_cpus=0.5, variants=["turbo"])},
        }
    )
    key = add_tenant(cfg, "limited", limits={"requests_per_minute": 6})
    serve.run(build_app(cfg), name="limits", route_prefix="/limits", blocking=False)
    try:
        url = f"{serve_app}/limits"
        wait_ready(url)
        status = serve.status().applications["limits"].deployments["Ingress"]
        assert status.replica_states.get("RUNNING") == 2

        def call(_):
            return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(call, range(16)))
        assert codes.count(200) == 6 and codes.count(429) == 10, codes
    finally:
        serve.delete("limits")
