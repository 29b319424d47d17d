"""What one tenant can make the ComfyUI API store and send back: graph and extra_data caps,
paged /history, bounded /queue and /api/jobs, finite numbers only, and /view serving images
(as the type their bytes are) under any file name."""

from __future__ import annotations

import io
import json
import threading
import uuid
from datetime import timedelta

import comfy_client
import httpx
import pytest
from PIL import Image

from tenants import add_tenant
from zimage_platform.db import utcnow
from zimage_platform.workflows.models import ComfyFileRow, ComfyPromptRow
from zimage_platform.workflows.store import ComfyStore


def png(color=(10, 20, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture()
def tenant(comfy_config, comfy_server):
    """A fresh tenant per test (its queue and history start empty) and its HTTP client."""
    name = f"t{uuid.uuid4().hex[:8]}"
    key = add_tenant(comfy_config, name, priority_class="standard")
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": key}, timeout=60) as client:
        yield name, client


@pytest.fixture()
def limits(comfy_server, monkeypatch):
    """The running server's limits, changeable per test (the service reads them per request)."""
    live = comfy_server.platform.services.config.limits

    def set_(**values):
        for name, value in values.items():
            monkeypatch.setattr(live, name, value)

    return set_


def store(comfy_server) -> ComfyStore:
    return ComfyStore(comfy_server.platform.services.store.engine)


def add_prompts(comfy_server, tenant_id: str, count: int, *, finished: bool, note_bytes: int = 10, extra=None):
    """Prompt rows as the API writes them: finished ones (no jobs: a success) or pending ones
    (their jobs not written yet, so they stay pending for a minute)."""
    now = utcnow()
    rows = []
    for i in range(count):
        rows.append(
            ComfyPromptRow(
                tenant_id=tenant_id,
                prompt_id=f"p{i:03}",
                number=i,
                client_id=None,
                graph={"9": {"class_type": "SaveImage", "inputs": {"note": "x" * note_bytes}}},
                extra_data=extra or {},
                outputs_to_execute=["9"],
                plan={"jobs": [], "class_types": {}, "order": []},
                job_ids=[] if finished else [f"job_missing_{tenant_id}_{i}"],
                request_hash="0" * 64,
                created_at=now + timedelta(milliseconds=i),
                finished_at=now + timedelta(milliseconds=i) if finished else None,
                state="success" if finished else None,
            )
        )
    for row in rows:
        store(comfy_server).add_prompt(row, [])
    return [row.prompt_id for row in rows]


# -- what is stored ---------------------------------------------------------------------------


def test_graph_and_extra_data_over_the_caps_are_refused(tenant, limits):
    _, http = tenant
    limits(max_graph_bytes=20_000, max_graph_nodes=30, max_extra_data_bytes=10_000)
    prompt = json.loads(comfy_client.prompt_text)
    big = json.loads(comfy_client.prompt_text)
    big["6"]["inputs"]["text"] = "x" * 20_000
    answer = http.post("/prompt", json={"prompt": big, "prompt_id": "too-big"})
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "graph_too_large"
    assert answer.json()["node_errors"] == {} and "20000" in answer.json()["error"]["message"]

    many = {**prompt, **{f"n{i}": {"class_type": "Note", "inputs": {}} for i in range(30)}}
    answer = http.post("/prompt", json={"prompt": many})
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "too_many_nodes"

    extra = {"extra_pnginfo": {"workflow": {"blob": "y" * 10_000}}}
    answer = http.post("/prompt", json={"prompt": prompt, "extra_data": extra})
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "extra_data_too_large"
    assert http.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}  # nothing was accepted
    assert http.get("/history/too-big").json() == {}


# -- what is sent back --------------------------------------------------------------------------


def test_history_is_paged(comfy_server, tenant, limits):
    tenant_id, http = tenant
    limits(history_page_items=3, max_page_items=5)
    ids = add_prompts(comfy_server, tenant_id, 7, finished=True)
    assert list(http.get("/history").json()) == ids[-3:]  # the default page: the last 3
    assert list(http.get("/history", params={"max_items": 100}).json()) == ids[-5:]  # the hard maximum
    assert list(http.get("/history", params={"max_items": 2, "offset": 1}).json()) == ids[1:3]
    assert list(http.get("/history", params={"max_items": 100, "offset": 4}).json()) == ids[4:]
    entry = http.get("/history").json()[ids[-1]]
    assert entry["prompt"][2]["9"]["inputs"]["note"] == "x" * 10 and entry["status"]["status_str"] == "success"


def test_history_stays_within_the_byte_budget(comfy_server, tenant, limits):
    tenant_id, http = tenant
    ids = add_prompts(comfy_server, tenant_id, 5, finished=True, note_bytes=1000)
    limits(max_listing_bytes=2500)  # two graphs of ~1 KB
    assert list(http.get("/history", params={"max_items": 5}).json()) == ids[-2:]  # the newest that fit
    assert list(http.get("/history", params={"max_items": 5, "offset": 0}).json()) == ids[:2]
    limits(max_listing_bytes=10)  # smaller than one graph: still one, or paging would stop
    assert list(http.get("/history", params={"max_items": 5, "offset": 3}).json()) == ids[3:4]


def test_queue_and_jobs_are_bounded(comfy_server, tenant, limits):
    tenant_id, http = tenant
    limits(history_page_items=2, max_page_items=3)
    pending = add_prompts(comfy_server, tenant_id, 5, finished=False)
    queue = http.get("/queue").json()
    assert [item[1] for item in queue["queue_pending"]] == pending[:3] and queue["queue_running"] == []
    assert queue["queue_pending"][0][2]["9"]["class_type"] == "SaveImage"  # the graph as sent
    assert http.get("/prompt").json() == {"exec_info": {"queue_remaining": 5}}  # every one counted

    jobs = http.get("/api/jobs").json()
    assert [j["id"] for j in jobs["jobs"]] == pending[::-1][:2]  # default page, newest first
    assert jobs["pagination"] == {"offset": 0, "limit": 2, "total": 5, "has_more": True}
    jobs = http.get("/api/jobs", params={"limit": 200, "offset": 1}).json()
    assert len(jobs["jobs"]) == 3 and jobs["pagination"]["limit"] == 3


def test_jobs_list_reads_the_workflow_id_without_the_graphs(comfy_server, tenant):
    tenant_id, http = tenant
    extra = {"extra_pnginfo": {"workflow": {"id": "wf-42", "nodes": []}}}
    (prompt_id,) = add_prompts(comfy_server, tenant_id, 1, finished=True, extra=extra)
    (job,) = http.get("/api/jobs").json()["jobs"]
    assert job["id"] == prompt_id and job["workflow_id"] == "wf-42" and job["status"] == "completed"
    assert http.get(f"/api/jobs/{prompt_id}").json()["workflow"]["extra_data"] == extra


# -- finite numbers only ---------------------------------------------------------------------


def test_non_finite_numbers_are_refused(tenant):
    _, http = tenant
    prompt = json.loads(comfy_client.prompt_text)
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = json.dumps({"prompt": prompt}).replace('"cfg": 1,', f'"cfg": {literal},')
        assert literal in body
        answer = http.post("/prompt", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "non_finite_number", literal

    for value in ("nan", "inf", "-Infinity"):
        widget = json.loads(comfy_client.prompt_text)
        widget["3"]["inputs"]["cfg"] = value
        answer = http.post("/prompt", json={"prompt": widget})
        assert answer.status_code == 400, answer.text
        (error,) = answer.json()["node_errors"]["3"]["errors"]
        assert error["type"] == "invalid_input_type" and error["extra_info"]["code"] == "non_finite_number"

    answer = http.post("/prompt", json={"prompt": prompt, "number": "inf"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "non_finite_number"
    queue = http.get("/queue")
    assert queue.status_code == 200 and queue.json() == {"queue_running": [], "queue_pending": []}


# -- /view --------------------------------------------------------------------------------------


def upload(http, data: bytes, name: str) -> httpx.Response:
    return http.post("/upload/image", files={"image": (name, data, "text/html")}, data={"type": "input"})


def test_view_names_any_file_name(tenant):
    _, http = tenant
    name = upload(http, png(), "猫 ü.png").json()["name"]
    assert name == "猫 ü.png"
    view = http.get("/view", params={"filename": name, "type": "input"})
    assert view.status_code == 200 and view.content == png()
    assert view.headers["content-disposition"] == "filename=\"_ _.png\"; filename*=UTF-8''%E7%8C%AB%20%C3%BC.png"
    from zimage_platform.api.comfy.protocol import content_disposition

    assert content_disposition('a "b"\\.png') == "filename=\"a _b__.png\"; filename*=UTF-8''a%20%22b%22%5C.png"
    plain = upload(http, png((1, 1, 1)), "plain.png").json()["name"]
    assert http.get("/view", params={"filename": plain, "type": "input"}).headers["content-disposition"] == (
        'filename="plain.png"'  # as ComfyUI writes it
    )


def test_view_serves_images_as_images_only(comfy_server, tenant):
    tenant_id, http = tenant
    name = upload(http, png(), "page.html").json()["name"]
    view = http.get("/view", params={"filename": name, "type": "input"})
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    assert view.headers["x-content-type-options"] == "nosniff"
    key = store(comfy_server).file(tenant_id, "input", "", name).s3_key
    stored = httpx.get(comfy_server.platform.services.results.presign_get(key))
    assert stored.headers["content-type"] == "image/png"  # stored as what Pillow read, not as named

    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    refused = upload(http, svg, "x.svg")
    assert refused.status_code == 400 and refused.json()["error"]["type"] == "image_unreadable"

    # A file whose bytes are not an image (stored before uploads were checked) is not served.
    results = comfy_server.platform.services.results
    results.put_bytes(f"tenants/{tenant_id}/comfy/input/legacy", b"<html><script>1</script></html>", "text/html")
    with store(comfy_server)._sessions() as s, s.begin():
        s.add(ComfyFileRow(tenant_id=tenant_id, type="input", subfolder="", filename="old.html",
                           s3_key=f"tenants/{tenant_id}/comfy/input/legacy"))  # fmt: skip
    old = http.get("/view", params={"filename": "old.html", "type": "input"})
    assert old.status_code == 415 and old.json()["error"]["type"] == "not_an_image"


# -- the event loop -----------------------------------------------------------------------------


def test_healthz_answers_while_system_stats_reads_the_disk(comfy_server, tenant, monkeypatch):
    """``/system_stats`` reads package metadata from disk: never on the event loop, so /healthz
    answers while that read hangs (on the loop it would answer only once the read is over)."""
    from zimage_platform.api.comfy import serving

    _, http = tenant
    entered, release, over = threading.Event(), threading.Event(), threading.Event()
    original = serving.package_version

    def hanging(name):
        entered.set()
        release.wait(20)
        over.set()
        return original(name)

    monkeypatch.setattr(serving, "package_version", hanging)
    caller = threading.Thread(target=lambda: http.get("/system_stats"))
    caller.start()
    try:
        assert entered.wait(20)
        assert httpx.get(f"{comfy_server.url}/healthz", timeout=30).status_code == 200
        assert not over.is_set(), "/healthz waited for the blocked call"
    finally:
        release.set()
        caller.join(30)
