"""The ComfyUI-style example client, changed only in its server address, against the real Ray
Serve application: HTTP and the WebSocket go through Serve's proxy to the ingress replicas,
events come from the scheduler deployment over a handle, images from S3."""

from __future__ import annotations

import io
import uuid

import httpx
from PIL import Image

from comfy import comfy_client


def test_unmodified_client_through_ray_serve(serve_app, serve_keys, monkeypatch):
    address = serve_app.removeprefix("http://")
    monkeypatch.setattr(comfy_client, "server_address", f"{address}/comfy/{serve_keys['acme']}")
    monkeypatch.setattr(comfy_client, "client_id", str(uuid.uuid4()))
    messages: list[dict] = []
    images = comfy_client.run(messages=messages)
    with Image.open(io.BytesIO(images["9"][0])) as png:
        assert png.format == "PNG" and png.size == (64, 64)
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "status" and "execution_start" in kinds
    assert kinds[-3:] == ["execution_success", "status", "executing"]
    progress = [(m["data"]["value"], m["data"]["max"]) for m in messages if m["type"] == "progress"]
    assert progress == [(i, 4) for i in range(1, 5)]

    # Another tenant sees none of it.
    other = {"X-API-Key": serve_keys["globex"]}
    prompt_id = next(m["data"]["prompt_id"] for m in messages if m["type"] == "execution_start")
    assert httpx.get(f"{serve_app}/history/{prompt_id}", headers=other).json() == {}
    executed = next(m["data"]["output"]["images"][0] for m in messages if m["type"] == "executed")
    assert httpx.get(f"{serve_app}/view", params=executed, headers=other).status_code == 404


def test_frontend_and_login_through_ray_serve(serve_app, serve_keys):
    """The ingress replicas serve the ComfyUI frontend behind the login (the package is found
    inside Ray's workers) and the session works through Serve's proxy."""
    browser = httpx.Client(base_url=serve_app, headers={"Origin": serve_app}, timeout=30)
    assert 'name="api_key"' in browser.get("/").text
    assert browser.post("/login", data={"api_key": serve_keys["acme"]}).status_code == 303
    index = browser.get("/")
    assert '<div id="vue-app">' in index.text
    script = index.text.split('src="./', 1)[1].split('"', 1)[0]
    assert browser.get(f"/{script}").headers["content-type"].startswith("text/javascript")
    assert browser.post("/api/settings", json={"Comfy.Locale": "en"}).status_code == 200
    assert browser.get("/api/settings").json() == {"Comfy.Locale": "en"}
    assert browser.get("/templates/index.json").status_code == 200
