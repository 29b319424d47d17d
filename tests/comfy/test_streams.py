"""Event streams (ComfyUI WebSockets, job server-sent events) over real HTTP: one cap per tenant
for both, and streams that end when their caller loses access (key revoked, tenant suspended,
browser session ended) — issue 12, item 12."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
import websocket

from comfy_server import browser_client
from isolated import isolated_config
from tenants import add_tenant, edit_tenant

SLOW = {"variant": "base", "prompt": "slow", "size": "512x512", "steps": 40}


@pytest.fixture(scope="module")
def comfy_config(config, s3, tmp_path_factory):
    limits = {"max_streams_per_tenant": 2, "stream_recheck_s": 0.3}
    return isolated_config(config, s3, tmp_path_factory.mktemp("streams"), limits=limits)


@pytest.fixture(scope="module")
def comfy_keys(comfy_config) -> dict[str, str]:
    names = ("capped", "other", "revoked", "suspended", "browser")
    return {name: add_tenant(comfy_config, name, priority_class="standard") for name in names}


def connect(server, *, key: str | None = None, cookie: str | None = None) -> websocket.WebSocket:
    url = server.url.replace("http://", "ws://") + f"/ws?clientId={uuid.uuid4().hex}"
    header = [f"X-API-Key: {key}"] if key else [f"Cookie: {cookie}"]
    return websocket.create_connection(url, header=header, origin=server.url, timeout=10)


def greeted(ws: websocket.WebSocket) -> websocket.WebSocket:
    assert json.loads(ws.recv())["type"] == "status"
    return ws


def close_frame(ws: websocket.WebSocket) -> tuple[int, str]:
    """The server's close frame: code and reason (messages before it are skipped)."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big"), data[2:].decode()


def open_streams(server, tenant: str) -> int:
    return server.platform.app.state.streams.count(tenant)


def until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_websockets_and_event_streams_share_one_cap_per_tenant(comfy_server, comfy_keys):
    key = comfy_keys["capped"]
    first, second = greeted(connect(comfy_server, key=key)), greeted(connect(comfy_server, key=key))
    code, reason = close_frame(connect(comfy_server, key=key))
    assert code == 4429 and reason.startswith("too_many_streams: this tenant already has 2 open event streams")
    http = httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": key}, timeout=60)
    job = http.post("/v1/jobs", json={"prompt": "x", "size": "64x64", "steps": 2}).json()["id"]
    refused = http.get(f"/v1/jobs/{job}/events")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
    greeted(connect(comfy_server, key=comfy_keys["other"])).close()  # other tenants are not affected
    first.close()
    until(lambda: open_streams(comfy_server, "capped") == 1)  # a closed socket gives its slot back
    events = http.get(f"/v1/jobs/{job}/events")  # the job is done: its stream replays and ends
    assert events.status_code == 200 and "event: succeeded" in events.text
    assert open_streams(comfy_server, "capped") == 1
    second.close()
    until(lambda: open_streams(comfy_server, "capped") == 0)


def test_streams_end_when_the_key_is_revoked(comfy_server, comfy_keys, comfy_config):
    key = comfy_keys["revoked"]
    ws = greeted(connect(comfy_server, key=key))
    http = httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": key}, timeout=60)
    job = http.post("/v1/jobs", json=SLOW).json()["id"]
    seen: list[tuple[str, dict]] = []
    revoked_at = datetime.now(UTC).isoformat()
    with http.stream("GET", f"/v1/jobs/{job}/events") as sse:
        name = None
        for line in sse.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                seen.append((name, json.loads(line.split(":", 1)[1])))
                if len(seen) == 1:  # the stream is open: now the key is revoked
                    edit_tenant(comfy_config, "revoked", lambda s: s["api_keys"][0].update(revoked_at=revoked_at))
    assert seen[0][0] == "queued" and seen[-1][0] == "closed"
    assert seen[-1][1]["error"]["code"] == "api_key_revoked"
    assert "succeeded" not in [n for n, _ in seen]  # it ended before the job did
    code, reason = close_frame(ws)
    assert code == 1008 and reason.startswith("api_key_revoked")
    until(lambda: open_streams(comfy_server, "revoked") == 0)


def test_a_socket_ends_when_its_tenant_is_suspended(comfy_server, comfy_keys, comfy_config):
    ws = greeted(connect(comfy_server, key=comfy_keys["suspended"]))
    edit_tenant(comfy_config, "suspended", lambda s: s.update(status="suspended", suspended_reason="unpaid"))
    started = time.monotonic()
    code, reason = close_frame(ws)  # nothing happens on the socket: the periodic check ends it
    assert code == 1008 and reason.startswith("tenant_suspended") and "unpaid" in reason
    assert time.monotonic() - started < 5


def test_a_browser_socket_ends_with_its_session(comfy_server, comfy_keys):
    browser = browser_client(comfy_server, comfy_keys["browser"])
    ws = greeted(connect(comfy_server, cookie=f"zimage_session={browser.cookies['zimage_session']}"))
    assert browser.post("/logout").status_code == 303  # the key stays good: only the session ends
    code, reason = close_frame(ws)
    assert code == 1008 and reason.startswith("session_expired")
