"""Queue, interrupt and history on durable jobs: per tenant, across ingress replicas, and
after a restart of the ingress."""

from __future__ import annotations

import json
import time
import uuid

import comfy_client
import httpx
import pytest
import websocket


def slow(steps: int = 30, seed: int = 1) -> dict:
    """A prompt on the Base variant (CFG, 256x256): about 0.17 s per step on these machines."""
    prompt = json.loads(comfy_client.prompt_text)
    prompt["4"]["inputs"]["ckpt_name"] = "z_image_base.safetensors"
    prompt["5"]["inputs"].update(width=256, height=256)
    prompt["3"]["inputs"].update(steps=steps, cfg=4.0, seed=seed)
    return prompt


def fast(seed: int = 1) -> dict:
    prompt = json.loads(comfy_client.prompt_text)
    prompt["3"]["inputs"]["seed"] = seed
    return prompt


class Session:
    """One tenant's HTTP client and (optionally) its socket."""

    def __init__(self, url: str, key: str, client_id: str | None = None) -> None:
        self.http = httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60)
        self.client_id = client_id or str(uuid.uuid4())
        self.ws: websocket.WebSocket | None = None
        self.url, self.key = url, key

    def connect(self, url: str | None = None) -> Session:
        self.ws = websocket.WebSocket()
        ws_url = (url or self.url).replace("http://", "ws://")
        self.ws.connect(f"{ws_url}/ws?clientId={self.client_id}", header=[f"X-API-Key: {self.key}"])
        self.ws.settimeout(60)
        first = json.loads(self.ws.recv())
        assert first["type"] == "status" and first["data"]["sid"] == self.client_id
        return self

    def queue(self, prompt: dict, **extra) -> str:
        response = self.http.post("/prompt", json={"prompt": prompt, "client_id": self.client_id, **extra})
        assert response.status_code == 200, response.text
        return response.json()["prompt_id"]

    def until(self, predicate, messages: list | None = None) -> dict:
        while True:
            message = json.loads(self.ws.recv())
            if messages is not None:
                messages.append(message)
            if predicate(message):
                return message

    def done(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + 120
        while (history := self.http.get(f"/history/{prompt_id}").json()) == {}:
            assert time.monotonic() < deadline, f"{prompt_id} never finished"
            time.sleep(0.05)
        return history[prompt_id]

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.http.close()


@pytest.fixture()
def acme(comfy_server, comfy_keys):
    session = Session(comfy_server.url, comfy_keys["acme"])
    yield session
    session.close()


@pytest.fixture()
def globex(comfy_server, comfy_keys):
    session = Session(comfy_server.url, comfy_keys["globex"])
    yield session
    session.close()


def is_done(prompt_id):
    return lambda m: m["type"] == "executing" and m["data"]["node"] is None and m["data"]["prompt_id"] == prompt_id


def test_interrupt_stops_the_running_prompt_only(acme):
    acme.connect()
    first = acme.queue(slow(steps=40))
    acme.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == first)
    # A targeted interrupt of a prompt that is not running does nothing (as ComfyUI).
    assert acme.http.post("/interrupt", json={"prompt_id": "not-running"}).status_code == 200
    assert [item[1] for item in acme.http.get("/queue").json()["queue_running"]] == [first]
    response = acme.http.post("/interrupt")  # no body: the global interrupt
    assert response.status_code == 200 and response.content == b"" and "content-type" not in response.headers
    messages: list[dict] = []
    acme.until(is_done(first), messages)
    stopped = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert stopped["prompt_id"] == first and stopped["node_id"] == "3" and stopped["node_type"] == "KSampler"
    assert set(stopped["executed"]) == {"4", "5", "6", "7"}
    entry = acme.done(first)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted" and entry["outputs"] == {}

    second = acme.queue(slow(steps=40, seed=2))
    acme.until(lambda m: m["type"] == "progress" and m["data"]["prompt_id"] == second)
    acme.http.post("/interrupt", json={"prompt_id": second})
    acme.until(is_done(second))
    assert acme.done(second)["status"]["messages"][-1][0] == "execution_interrupted"
    job = acme.http.get("/v1/jobs", params={"status": "cancelled"}).json()["data"][0]
    assert job["error"]["code"] == "cancelled_by_client" and job["images"][0]["status"] == "cancelled"


def test_queue_delete_and_clear_remove_pending_prompts(acme):
    running = acme.queue(slow(steps=30))
    deadline = time.monotonic() + 30
    while [i[1] for i in acme.http.get("/queue").json()["queue_running"]] != [running]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Same variant and engine slot: these wait behind the running prompt.
    pending = [acme.queue(slow(steps=2, seed=s)) for s in (2, 3, 4)]
    queue = acme.http.get("/queue").json()
    assert [i[1] for i in queue["queue_pending"]] == pending
    numbers = [i[0] for i in queue["queue_pending"]]
    assert numbers == sorted(numbers) and queue["queue_pending"][0][3] == {"client_id": acme.client_id}
    assert acme.http.get("/prompt").json() == {"exec_info": {"queue_remaining": 4}}

    assert acme.http.post("/queue", json={"delete": [pending[1]]}).status_code == 200
    assert [i[1] for i in acme.http.get("/queue").json()["queue_pending"]] == [pending[0], pending[2]]
    assert acme.http.post("/queue", json={"clear": True}).status_code == 200
    queue = acme.http.get("/queue").json()
    assert queue["queue_pending"] == [] and [i[1] for i in queue["queue_running"]] == [running]
    acme.http.post("/interrupt")
    acme.done(running)
    history = acme.http.get("/history").json()
    assert running in history and not set(pending) & set(history)
    assert all(acme.http.get(f"/history/{p}").json() == {} for p in pending)


def test_tenants_see_only_their_own(acme, globex, comfy_server):
    shared_id = str(uuid.uuid4())  # ids are per tenant: both may use the same one
    acme.connect()
    globex.client_id = acme.client_id  # even the same client id does not cross tenants
    globex.connect()
    prompt_id = acme.queue(fast(seed=11), prompt_id=shared_id)
    entry = acme.done(prompt_id)
    image = entry["outputs"]["9"]["images"][0]
    assert acme.http.get("/view", params=image).status_code == 200

    assert globex.http.get(f"/history/{prompt_id}").json() == {}
    assert prompt_id not in globex.http.get("/history").json()
    view = globex.http.get("/view", params=image)
    assert view.status_code == 404 and view.content == b""
    globex.http.post("/history", json={"delete": [prompt_id]})
    globex.http.post("/history", json={"clear": True})
    assert acme.http.get(f"/history/{prompt_id}").json() != {}

    running = acme.queue(slow(steps=20, seed=12))
    assert globex.http.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    globex.http.post("/interrupt")
    globex.http.post("/queue", json={"clear": True, "delete": [running]})
    assert acme.done(running)["status"]["status_str"] == "success"  # untouched by the other tenant

    assert globex.queue(fast(seed=13), prompt_id=shared_id) == shared_id
    assert globex.done(shared_id)["prompt"][2]["3"]["inputs"]["seed"] == 13
    assert acme.done(shared_id)["prompt"][2]["3"]["inputs"]["seed"] == 11
    # globex's socket heard nothing of acme's prompts (only its own, and queue sizes).
    globex.ws.settimeout(0.5)
    heard = []
    try:
        while True:
            heard.append(json.loads(globex.ws.recv()))
    except websocket.WebSocketTimeoutException:
        pass
    prompts = {m["data"].get("prompt_id") for m in heard if m["type"] != "status"}
    assert prompts <= {shared_id} and running not in prompts


def test_socket_on_another_replica_and_a_retried_post(acme, comfy_server):
    """The socket is held by one ingress replica, the POST lands on another: the socket finds
    the prompt in the database and relays its events. A retried POST (same prompt_id, same
    graph) is the same prompt; another graph under that id is refused."""
    acme.connect(comfy_server.replica_url)
    prompt_id = str(uuid.uuid4())
    acme.queue(fast(seed=21), prompt_id=prompt_id)
    messages: list[dict] = []
    acme.until(is_done(prompt_id), messages)
    kinds = [m["type"] for m in messages]
    assert "execution_start" in kinds and "execution_success" in kinds and kinds.count("progress") == 4
    again = acme.http.post(
        "/prompt", json={"prompt": fast(seed=21), "client_id": acme.client_id, "prompt_id": prompt_id}
    )
    assert again.status_code == 200 and again.json()["prompt_id"] == prompt_id
    other = acme.http.post(
        "/prompt", json={"prompt": fast(seed=22), "client_id": acme.client_id, "prompt_id": prompt_id}
    )
    assert other.status_code == 400 and other.json()["error"]["type"] == "invalid_prompt_id"
    assert len(acme.http.get("/v1/jobs").json()["data"]) == len(
        {j["id"] for j in acme.http.get("/v1/jobs").json()["data"]}
    )


async def test_history_survives_an_ingress_restart(comfy_server, comfy_config, comfy_keys):
    """A new ingress (new process state, same database and S3) answers the same history and files."""
    from zimage_platform.api import create_api
    from zimage_platform.serve.components import job_store, platform_services

    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["acme"]}, timeout=60) as http:
        prompt_id = http.post("/prompt", json={"prompt": fast(seed=31)}).json()["prompt_id"]
        deadline = time.monotonic() + 60
        while (before := http.get(f"/history/{prompt_id}").json()) == {}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    services = platform_services(comfy_config, comfy_server.platform.services.scheduler, store=job_store(comfy_config))
    transport = httpx.ASGITransport(app=create_api(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://fresh", timeout=60) as fresh:
        fresh.headers["X-API-Key"] = comfy_keys["acme"]
        after = (await fresh.get(f"/history/{prompt_id}")).json()
        assert after == before
        image = after[prompt_id]["outputs"]["9"]["images"][0]
        assert (await fresh.get("/view", params=image)).content.startswith(b"\x89PNG")
    await services.http.aclose()
