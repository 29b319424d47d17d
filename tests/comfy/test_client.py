"""An unmodified ComfyUI-style client (only its server address changed) against the platform
over real HTTP and WebSocket; the polling style; the key as a header or a path prefix."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid

import comfy_client
import httpx
import pytest
from PIL import Image

from zimage_platform.api.comfy.api_router import ComfyKeyPrefix


@pytest.fixture()
def client(comfy_server, comfy_keys, monkeypatch):
    """The example client pointed at ``/comfy/<key>`` (its only change) with a fresh client id."""
    monkeypatch.setattr(comfy_client, "server_address", f"{comfy_server.address}/comfy/{comfy_keys['acme']}")
    monkeypatch.setattr(comfy_client, "client_id", str(uuid.uuid4()))
    return comfy_client


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def test_websocket_client_gets_its_images(client):
    messages: list[dict] = []
    images = client.run(messages=messages)
    assert list(images) == ["9"] and len(images["9"]) == 1
    assert png_size(images["9"][0]) == (64, 64)

    kinds = [m["type"] for m in messages]
    assert kinds[0] == "status" and "sid" in messages[0]["data"]
    assert messages[0]["data"]["sid"] == client.client_id
    start = kinds.index("execution_start")
    assert kinds[start + 1] == "execution_cached"
    assert messages[start + 1]["data"]["nodes"] == []
    executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
    # Every node of the graph runs, each after its inputs; node null closes the prompt.
    assert executing[-1] is None and set(executing[:-1]) == {"3", "4", "5", "6", "7", "8", "9"}
    assert executing.index("3") > max(executing.index(n) for n in ("4", "5", "6", "7"))
    assert executing.index("8") > executing.index("3") and executing.index("9") > executing.index("8")
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(i, 4, "3") for i in range(1, 5)]
    executed = next(m["data"] for m in messages if m["type"] == "executed")
    assert executed["node"] == "9" and executed["output"]["images"][0]["filename"] == "ComfyUI_00001_.png"
    assert kinds[-3:] == ["execution_success", "status", "executing"]
    assert messages[-2]["data"]["status"]["exec_info"]["queue_remaining"] == 0


def test_batches_and_output_names_count_up(client):
    def batch_and_subfolder(prompt):
        prompt["5"]["inputs"]["batch_size"] = 2
        prompt["9"]["inputs"]["filename_prefix"] = "sub/batch"

    images = client.run([batch_and_subfolder])
    assert [png_size(p) for p in images["9"]] == [(64, 64), (64, 64)]
    assert images["9"][0] != images["9"][1]  # seeds seed and seed+1
    again = client.run([batch_and_subfolder])
    assert len(again["9"]) == 2
    history = httpx.get(f"http://{client.server_address}/history").json()
    names = sorted(
        image["filename"]
        for entry in history.values()
        for output in entry["outputs"].values()
        for image in output["images"]
        if image["subfolder"] == "sub"
    )
    assert names == [f"batch_{i:05}_.png" for i in range(1, 5)]


def test_polling_style_with_a_bearer_header(comfy_server, comfy_keys):
    """POST /prompt, poll /history/{id} until it appears, then /view: no socket at all."""
    headers = {"Authorization": f"Bearer {comfy_keys['acme']}"}
    prompt = json.loads(comfy_client.prompt_text)
    prompt["5"]["inputs"].update(width=128, height=128)
    prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    with httpx.Client(base_url=comfy_server.url, headers=headers, timeout=30) as http:
        answer = http.post("/prompt", json={"prompt": prompt}).json()
        assert answer["node_errors"] == {} and isinstance(answer["number"], int)
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + 60
        while (history := http.get(f"/history/{prompt_id}").json()) == {}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        entry = history[prompt_id]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
        assert entry["prompt"][:2] == [answer["number"], prompt_id] and entry["prompt"][4] == ["9", "10"]
        assert set(entry["meta"]) == {"9", "10"}
        saved, preview = entry["outputs"]["9"]["images"][0], entry["outputs"]["10"]["images"][0]
        assert saved["type"] == "output" and preview["type"] == "temp"
        assert preview["filename"].startswith("ComfyUI_temp_") and preview["filename"].endswith("_00001_.png")
        for ref in (saved, preview):
            view = http.get("/view", params=ref)
            assert view.status_code == 200 and view.headers["content-type"] == "image/png"
            assert view.headers["content-disposition"] == f'filename="{ref["filename"]}"'
            assert png_size(view.content) == (128, 128)
        # The same through ComfyUI's /api prefix, and a preview conversion.
        assert http.get(f"/api/history/{prompt_id}").json() == history
        webp = http.get("/api/view", params={**saved, "preview": "webp;50"})
        assert webp.headers["content-type"] == "image/webp" and webp.content[8:12] == b"WEBP"
        assert http.get("/queue").json() == {"queue_running": [], "queue_pending": []}
        assert http.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def test_path_prefix_key_and_refusals(comfy_server, comfy_keys):
    base = comfy_server.url
    with urllib.request.urlopen(f"{base}/comfy/{comfy_keys['acme']}/api/queue") as response:
        assert json.loads(response.read()) == {"queue_running": [], "queue_pending": []}
    for url in (f"{base}/queue", f"{base}/comfy/zk_000000000000_{'b' * 43}/queue"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url)
        assert err.value.code == 401
        body = json.loads(err.value.read())
        assert set(body) == {"error", "node_errors"} and set(body["error"]) == {
            "type",
            "message",
            "details",
            "extra_info",
        }
    # The prefix is only for ComfyUI routes: the native API keeps its own auth.
    assert httpx.get(f"{base}/comfy/{comfy_keys['acme']}/v1/jobs").status_code == 404


async def test_key_prefix_rewrites_path_and_header():
    seen = {}

    async def app(scope, receive, send):
        seen.update(path=scope["path"], headers=dict(scope["headers"]))

    await ComfyKeyPrefix(app)({"type": "websocket", "path": "/comfy/zk_a_b/ws", "headers": []}, None, None)
    assert seen == {"path": "/ws", "headers": {b"x-api-key": b"zk_a_b"}}
    await ComfyKeyPrefix(app)(
        {"type": "http", "path": "/comfy/zk_a_b/prompt", "headers": [(b"authorization", b"Bearer other")]}, None, None
    )
    assert seen["path"] == "/prompt" and b"x-api-key" not in seen["headers"]  # an explicit header wins
    mounted = {"type": "http", "root_path": "/zimage", "path": "/zimage/comfy/zk_a_b/api/queue", "headers": []}
    await ComfyKeyPrefix(app)(mounted, None, None)
    assert seen["path"] == "/zimage/api/queue" and seen["headers"] == {b"x-api-key": b"zk_a_b"}
    # Not a ComfyUI route: no header, and the key leaves the path all the same (it 404s).
    await ComfyKeyPrefix(app)({"type": "http", "path": "/comfy/zk_a_b/v1/jobs", "headers": []}, None, None)
    assert seen == {"path": "/comfy/-/v1/jobs", "headers": {}}
    await ComfyKeyPrefix(app)({"type": "http", "path": "/comfy/zk_a_b", "headers": []}, None, None)
    assert seen == {"path": "/comfy/-", "headers": {}}
