"""Login, the session cookie and its checks (CSRF, revocation, expiry, logout), and the
frontend's files and templates, over real HTTP."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from datetime import UTC, datetime

import httpx
import pytest
import websocket

from comfy_server import browser_client
from tenants import edit_tenant

GRAPH = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "z_image_turbo.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
    "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 7,
            "steps": 2,
            "cfg": 1,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "web", "images": ["8", 0]}},
}


def session_rows(web_config) -> list[tuple]:
    db = web_config.database.url.split("///", 1)[1]
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT token_hash, tenant_id, key_id FROM browser_sessions").fetchall()


def test_login_page_then_frontend(web_server, web_keys, web_config):
    anonymous = httpx.Client(base_url=web_server.url)
    page = anonymous.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'action="login"' in page.text and 'name="api_key"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), "the login page loads nothing from elsewhere"
    assert anonymous.get("/api/queue").status_code == 401

    bad = anonymous.post("/login", data={"api_key": "zk_nope"})
    assert bad.status_code == 401 and "invalid_api_key" in bad.text and "set-cookie" not in bad.headers

    key = web_keys["acme"]
    done = anonymous.post("/login", data={"api_key": key})
    assert done.status_code == 303 and done.headers["location"] == "./"
    cookie = done.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "max-age"} <= attributes and "secure" not in attributes  # plain http here
    assert "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
    token = cookie.split(";")[0].split("=", 1)[1]
    assert key not in cookie and key.split("_")[2] not in cookie
    rows = session_rows(web_config)
    assert token not in json.dumps(rows) and any(r[1] == "acme" and r[2] == key.split("_")[1] for r in rows)

    index = anonymous.get("/")
    assert index.status_code == 200 and '<div id="vue-app">' in index.text
    assert index.headers["cache-control"] == "no-cache"
    assert anonymous.get("/api/queue").json() == {"queue_running": [], "queue_pending": []}
    assert anonymous.get("/api/users").json() == {"storage": "server", "migrated": False}


def test_secure_cookie_behind_https(web_server, web_keys):
    client = httpx.Client(base_url=web_server.url, headers={"X-Forwarded-Proto": "https"})
    cookie = client.post("/login", data={"api_key": web_keys["acme"]}).headers["set-cookie"]
    assert "secure" in {p.strip().lower() for p in cookie.split(";")}


def test_state_changes_with_the_cookie_need_this_origin(web_server, web_keys):
    browser = browser_client(web_server, web_keys["acme"])
    cookies = dict(browser.cookies)
    bare = httpx.Client(base_url=web_server.url, cookies=cookies)  # no Origin, no Referer
    refused = bare.post("/api/settings", json={"Comfy.Locale": "en"})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "csrf_origin_missing"
    foreign = bare.post("/api/settings", json={"Comfy.Locale": "en"}, headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403 and foreign.json()["error"]["type"] == "csrf_origin_mismatch"
    from_referer = bare.post(
        "/api/settings", json={"Comfy.Locale": "fr"}, headers={"Referer": f"{web_server.url}/?x=1"}
    )
    assert from_referer.status_code == 200
    assert bare.get("/api/settings/Comfy.Locale").json() == "fr"  # reads need no Origin
    # A key header is not a cookie: API clients never need an Origin.
    keyed = httpx.Client(base_url=web_server.url, headers={"X-API-Key": web_keys["acme"]})
    assert keyed.post("/api/settings", json={"Comfy.Locale": "en"}).status_code == 200
    # Logging in from another site is refused too (login CSRF).
    cross = httpx.Client(base_url=web_server.url, headers={"Origin": "http://evil.example"})
    assert cross.post("/login", data={"api_key": web_keys["acme"]}).status_code == 403


def test_websocket_takes_the_cookie_from_this_origin_only(web_server, web_keys):
    browser = browser_client(web_server, web_keys["globex"])
    cookie = f"zimage_session={browser.cookies['zimage_session']}"
    ws_url = web_server.url.replace("http", "ws") + "/ws?clientId=web-test"
    ws = websocket.create_connection(ws_url, header=[f"Cookie: {cookie}"], origin=web_server.url, timeout=10)
    hello = json.loads(ws.recv())
    assert hello["type"] == "status" and hello["data"]["sid"] == "web-test"
    ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:  # closed before the handshake
        websocket.create_connection(ws_url, header=[f"Cookie: {cookie}"], origin="http://evil.example", timeout=10)
    assert refused.value.status_code == 403


def test_prompt_with_the_cookie_and_jobs_api(web_server, web_keys):
    acme, globex = browser_client(web_server, web_keys["acme"]), browser_client(web_server, web_keys["globex"])
    queued = acme.post("/api/prompt", json={"prompt": GRAPH, "client_id": "fox"})
    assert queued.status_code == 200, queued.text
    prompt_id = queued.json()["prompt_id"]
    deadline = datetime.now(UTC).timestamp() + 60
    while datetime.now(UTC).timestamp() < deadline:
        job = acme.get(f"/api/jobs/{prompt_id}").json()
        if job["status"] not in ("pending", "in_progress"):
            break
        time.sleep(0.2)
    assert job["status"] == "completed", job
    assert job["outputs"]["9"]["images"][0]["filename"].startswith("web_")
    assert job["workflow"]["prompt"] == GRAPH and job["execution_end_time"] >= job["execution_start_time"]
    listed = acme.get("/api/jobs", params={"status": "completed,failed,cancelled", "limit": 200, "offset": 0}).json()
    assert listed["pagination"] == {"offset": 0, "limit": 200, "total": 1, "has_more": False}
    (summary,) = listed["jobs"]
    assert summary["id"] == prompt_id and summary["outputs_count"] == 1 and "outputs" not in summary
    preview = summary["preview_output"]
    assert preview["nodeId"] == "9" and preview["mediaType"] == "images" and preview["type"] == "output"
    image = acme.get("/api/view", params={k: preview[k] for k in ("filename", "subfolder", "type")})
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert acme.post(f"/api/jobs/{prompt_id}/cancel").json() == {"job_id": prompt_id, "result": "terminal"}
    assert acme.get("/api/jobs", params={"status": "bogus"}).status_code == 400
    # Another tenant's browser sees none of it.
    assert globex.get("/api/jobs").json()["jobs"] == []
    assert globex.get(f"/api/jobs/{prompt_id}").status_code == 404
    assert globex.get("/api/view", params={k: preview[k] for k in ("filename", "subfolder", "type")}).status_code == 404


def until_status(call, status: int, timeout_s: float = 10.0):
    """The first answer with ``status`` (a tenant file's change is seen within ``reload_s``, later
    on a loaded machine); the last answer if none came in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = call()
        if answer.status_code == status or time.monotonic() > deadline:
            assert answer.status_code == status, answer.text
            return answer
        time.sleep(0.05)


def test_revoked_key_and_suspended_tenant_end_sessions(web_server, web_keys, web_config):
    browser = browser_client(web_server, web_keys["initech"])
    assert browser.get("/api/settings").status_code == 200
    edit_tenant(web_config, "initech", lambda s: s.update(status="suspended", suspended_reason="unpaid"))
    try:
        refused = until_status(lambda: browser.get("/api/settings"), 403)
        assert refused.json()["error"]["type"] == "tenant_suspended"
    finally:
        edit_tenant(web_config, "initech", lambda s: s.update(status="active", suspended_reason=None))
    browser = browser_client(web_server, web_keys["initech"])
    assert browser.get("/api/settings").status_code == 200
    revoked_at = datetime.now(UTC).isoformat()
    edit_tenant(web_config, "initech", lambda s: s["api_keys"][0].update(revoked_at=revoked_at))
    refused = until_status(lambda: browser.get("/api/settings"), 401)  # tenant files are re-read every reload_s
    assert refused.json()["error"]["type"] == "api_key_revoked"
    assert browser.get("/").text.count('name="api_key"') == 1  # back to the login page
    assert not [r for r in session_rows(web_config) if r[1] == "initech"]  # the dead session is gone


def test_logout_and_expiry(web_server, web_keys, web_config):
    browser = browser_client(web_server, web_keys["globex"])
    token = browser.cookies["zimage_session"]
    assert 'action="logout"' in browser.get("/logout").text
    out = browser.post("/logout")
    assert out.status_code == 303 and "zimage_session=" in out.headers["set-cookie"]
    replay = httpx.Client(base_url=web_server.url, cookies={"zimage_session": token})
    expired = replay.get("/api/queue")
    assert expired.status_code == 401 and expired.json()["error"]["type"] == "session_expired"

    from datetime import timedelta

    from zimage_platform.browser import SessionStore
    from zimage_platform.db import create_db_engine

    store = SessionStore(create_db_engine(web_config.database.url))
    old, _ = store.create("globex", web_keys["globex"].split("_")[1], timedelta(seconds=-1))
    stale = httpx.Client(base_url=web_server.url, cookies={"zimage_session": old})
    assert stale.get("/api/queue").json()["error"]["type"] == "session_expired"
    assert 'name="api_key"' in stale.get("/").text


def test_frontend_files_and_templates(web_server, web_keys):
    anonymous = httpx.Client(base_url=web_server.url)
    browser = browser_client(web_server, web_keys["acme"])
    index = browser.get("/").text
    script = re.search(r'src="\./(assets/index-[^"]+\.js)"', index).group(1)
    js = anonymous.get(f"/{script}")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert anonymous.get(f"/{script}", headers={"If-None-Match": js.headers["etag"]}).status_code == 304
    css = anonymous.get("/materialdesignicons.min.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert css.headers["cache-control"] == "no-cache"
    assert anonymous.get("/assets/no-such-file.js").status_code == 404
    assert anonymous.post("/no/such/route").status_code == 404  # the API's 404s are untouched

    templates = anonymous.get("/templates/index.json")
    assert templates.headers["content-type"] == "application/json"
    names = {t["name"] for category in templates.json() for t in category["templates"]}
    assert "image_z_image_turbo" in names
    assert all("Z-Image" in " ".join(t["models"]) for c in templates.json() for t in c["templates"])
    assert "Z-Image" in anonymous.get("/templates/index.zh.json").text
    workflow = anonymous.get("/templates/image_z_image_turbo.json").json()
    assert workflow["definitions"]["subgraphs"][0]["name"] == "Text to Image (Z-Image-Turbo)"
    assert anonymous.get("/templates/..%2F..%2Fsecrets.json").status_code == 404
    assert anonymous.get("/templates/image_z_image_turbo-1.webp").status_code == 404

    assert browser.get("/api/extensions").json() == sorted(browser.get("/api/extensions").json())
    assert browser.get("/api/i18n").json() == {} and browser.get("/api/workflow_templates").json() == {}
    folders = browser.get("/api/experiment/models").json()
    assert {"name": "diffusion_models", "folders": []} in folders
    assert {"name": "z_image_turbo.safetensors", "pathIndex": 0} in browser.get(
        "/api/experiment/models/diffusion_models"
    ).json()
    system = browser.get("/api/system_stats").json()["system"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", system["required_frontend_version"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", system["installed_templates_version"])
