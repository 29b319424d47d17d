"""Saved workflows over HTTP (per tenant, versioned, run as platform jobs), and the workflow and
ComfyUI stores on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import comfy_client
import httpx
import pytest


def workflow_body(**changes) -> dict:
    graph = json.loads(comfy_client.prompt_text)
    body = {
        "graph": graph,
        "parameters": {
            "prompt": ["6", "inputs", "text"],
            "seed": {"path": ["3", "inputs", "seed"], "description": "noise seed"},
            "size": {"type": "size", "width": ["5", "inputs", "width"], "height": ["5", "inputs", "height"]},
            "steps": {"path": ["3", "inputs", "steps"], "default": 2},
        },
        "description": "the example graph",
    }
    body.update(changes)
    return body


@pytest.fixture(scope="module")
def http(comfy_server, comfy_keys):
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["acme"]}, timeout=60) as c:
        yield c


def finished(http, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_save_version_list_run_delete(http, comfy_server, comfy_keys):
    created = http.put("/v1/workflows/catalogue-shot", json=workflow_body())
    assert created.status_code == 201, created.text
    saved = created.json()
    assert (saved["object"], saved["version"], saved["versions"]) == ("workflow", 1, [1])
    assert saved["parameters"]["prompt"] == {"path": ["6", "inputs", "text"], "type": "string"}
    assert saved["parameters"]["size"]["type"] == "size" and saved["parameters"]["steps"]["type"] == "int"
    assert http.put("/v1/workflows/catalogue-shot", json=workflow_body()).status_code == 200  # unchanged
    changed = workflow_body()
    changed["graph"]["7"]["inputs"]["text"] = "blurry"
    assert http.put("/v1/workflows/catalogue-shot", json=changed).json()["version"] == 2
    assert http.get("/v1/workflows/catalogue-shot", params={"version": 1}).json()["graph"]["7"]["inputs"]["text"] == (
        "bad hands"
    )
    listing = http.get("/v1/workflows").json()
    assert listing["object"] == "list"
    assert [(w["name"], w["version"]) for w in listing["data"]] == [("catalogue-shot", 2)]
    assert listing["data"][0]["parameters"] == ["prompt", "seed", "size", "steps"]

    run = http.post(
        "/v1/workflows/catalogue-shot/run",
        json={"parameters": {"prompt": "white sneakers on a table", "seed": 7, "size": "128x128"}},
        headers={"Idempotency-Key": "shot-1"},
    )
    assert run.status_code == 202, run.text
    job = run.json()
    assert run.headers["location"] == f"/v1/jobs/{job['id']}"
    assert set(job) == set(http.post("/v1/jobs", json={"prompt": "x", "size": "64x64", "steps": 1}).json())
    assert (job["object"], job["kind"], job["n"]) == ("job", "text2img", 1)
    params = job["params"]
    assert (params["prompt"], params["size"], params["steps"], params["negative_prompt"]) == (
        "white sneakers on a table",
        "128x128",
        2,
        "blurry",
    )
    assert job["images"][0]["seed"] == 7
    done = finished(http, job["id"])
    assert done["status"] == "succeeded" and httpx.get(done["images"][0]["url"]).content.startswith(b"\x89PNG")
    replay = http.post(
        "/v1/workflows/catalogue-shot/run",
        json={"parameters": {"prompt": "white sneakers on a table", "seed": 7, "size": "128x128"}},
        headers={"Idempotency-Key": "shot-1"},
    )
    assert replay.status_code == 200 and replay.json()["id"] == job["id"]
    old = http.post("/v1/workflows/catalogue-shot/run", json={"version": 1, "parameters": {"steps": 1}}).json()
    assert old["params"]["negative_prompt"] == "bad hands" and old["params"]["steps"] == 1

    # Tenants' workflows are their own.
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["globex"]}) as other:
        assert other.get("/v1/workflows/catalogue-shot").status_code == 404
        assert other.post("/v1/workflows/catalogue-shot/run", json={}).status_code == 404
        assert other.get("/v1/workflows").json()["data"] == []
        assert other.delete("/v1/workflows/catalogue-shot").status_code == 404

    assert http.delete("/v1/workflows/catalogue-shot").status_code == 204
    missing = http.get("/v1/workflows/catalogue-shot")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "workflow_not_found"


def test_refusals_name_the_parameter(http):
    http.put("/v1/workflows/strict", json=workflow_body())
    unknown = http.post("/v1/workflows/strict/run", json={"parameters": {"colour": "red"}})
    error = unknown.json()["error"]
    assert unknown.status_code == 422 and error["code"] == "unknown_parameter"
    assert error["choices"] == ["prompt", "seed", "size", "steps"]
    size = http.post("/v1/workflows/strict/run", json={"parameters": {"size": "1000x1000"}})
    error = size.json()["error"]
    assert size.status_code == 422 and (error["code"], error["param"]) == ("unsupported_size", "size")
    assert "1024x1024" in error["choices"] and "5" in error["node_errors"]
    wrong = http.post("/v1/workflows/strict/run", json={"parameters": {"seed": "seven"}})
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "parameters.seed"
    steps = http.post("/v1/workflows/strict/run", json={"parameters": {"steps": 99}})
    assert steps.json()["error"]["code"] == "steps_out_of_range" and steps.json()["error"]["param"] == "steps"

    bad_graph = workflow_body()
    bad_graph["graph"]["3"]["inputs"]["sampler_name"] = "lcm"
    error = http.put("/v1/workflows/broken", json=bad_graph).json()["error"]
    assert error["code"] == "value_not_in_list" and error["param"] == "graph.3.inputs.sampler_name"
    assert error["node_errors"]["3"]["errors"][0]["details"].startswith("sampler_name: 'lcm' not in")
    link = workflow_body(parameters={"model": ["3", "inputs", "model"]})
    error = http.put("/v1/workflows/broken", json=link).json()["error"]
    assert error["code"] == "invalid_parameter" and error["param"] == "parameters.model"
    two = workflow_body()
    two["graph"]["13"] = {"class_type": "KSampler", "inputs": {**two["graph"]["3"]["inputs"], "seed": 2}}
    two["graph"]["14"] = {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}}
    two["graph"]["15"] = {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}}
    assert http.put("/v1/workflows/broken", json=two).json()["error"]["code"] == "workflow_multiple_jobs"
    assert http.put("/v1/workflows/bad name!", json=workflow_body()).status_code == 422
    assert http.get("/v1/workflows/broken").status_code == 404  # nothing refused was saved


def test_stores_on_both_databases(database_url):
    from zimage_platform.db import create_db_engine
    from zimage_platform.db.migrate import downgrade, upgrade
    from zimage_platform.workflows.models import ComfyPromptRow
    from zimage_platform.workflows.store import ComfyStore, Upload, WorkflowStore

    engine = create_db_engine(database_url)
    workflows = WorkflowStore(engine)
    row, created = workflows.put("acme", "shot", {"1": {}}, {"p": {"path": ["1", "inputs", "x"]}}, None)
    assert created and row.version == 1
    same, created = workflows.put("acme", "shot", {"1": {}}, {"p": {"path": ["1", "inputs", "x"]}}, None)
    assert not created and same.id == row.id
    assert workflows.put("acme", "shot", {"2": {}}, {}, "v2")[0].version == 2
    workflows.put("acme", "other", {"3": {}}, {}, None)
    workflows.put("globex", "shot", {"9": {}}, {}, None)
    assert [(r.name, r.version) for r in workflows.latest("acme")] == [("other", 1), ("shot", 2)]
    assert workflows.get("acme", "shot", 1).graph == {"1": {}} and workflows.versions("acme", "shot") == [1, 2]
    assert workflows.delete("acme", "shot") == 2 and workflows.get("acme", "shot", missing_ok=True) is None
    assert workflows.get("globex", "shot").graph == {"9": {}}

    comfy = ComfyStore(engine)
    with ThreadPoolExecutor(8) as pool:  # replicas taking numbers at once never share one
        firsts = list(pool.map(lambda _: comfy.take("acme", "prompt"), range(40)))
    assert sorted(firsts) == list(range(1, 41))
    assert comfy.take("acme", "file:output:/x", 3) == 1 and comfy.take("acme", "file:output:/x", 2) == 4
    assert comfy.take("globex", "prompt") == 1

    upload = Upload("input", "", "a.png", "k1", "h1", 8, 8)
    assert comfy.save_upload("acme", upload, overwrite=False) == "a.png"
    assert comfy.save_upload("acme", upload, overwrite=False) == "a.png"
    other = Upload("input", "", "a.png", "k2", "h2", 8, 8)
    assert comfy.save_upload("acme", other, overwrite=False) == "a (1).png"
    assert comfy.save_upload("acme", other, overwrite=True) == "a.png"
    assert (
        comfy.file("acme", "input", "", "a.png").sha256 == "h2" and comfy.file("globex", "input", "", "a.png") is None
    )
    assert comfy.input_images("acme") == {"a.png": (8, 8), "a (1).png": (8, 8)}

    from zimage_platform.db import utcnow

    for i, pid in enumerate(("p1", "p2", "p3")):
        comfy.add_prompt(
            ComfyPromptRow(
                tenant_id="acme",
                prompt_id=pid,
                number=i,
                client_id="c",
                graph={},
                extra_data={},
                outputs_to_execute=[],
                plan={"jobs": []},
                job_ids=[],
                request_hash="h",
                created_at=utcnow(),
            ),
            [],
        )
    comfy.finish("acme", "p1", "success", utcnow())
    comfy.finish("acme", "p2", "error", utcnow())
    comfy.finish("acme", "p2", "success", utcnow())  # the first observer's view stands
    assert [r.prompt_id for r in comfy.history("acme", max_items=None, offset=None)] == ["p1", "p2"]
    assert [r.prompt_id for r in comfy.history("acme", max_items=1, offset=None)] == ["p2"]
    assert comfy.prompt("acme", "p2").state == "error" and comfy.prompt("globex", "p2") is None
    assert [r.prompt_id for r in comfy.unfinished("acme")] == ["p3"]
    comfy.mark("acme", ["p1"], history_deleted=True)
    assert [r.prompt_id for r in comfy.history("acme", max_items=None, offset=None)] == ["p2"]
    # Listings read rows without their bodies, then sizes and workflow ids by SQL (JSON on both).
    with pytest.raises(Exception):  # noqa: B017 (raiseload or detached: either way never read)
        _ = comfy.unfinished("acme")[0].graph
    comfy.add_prompt(
        ComfyPromptRow(
            tenant_id="acme",
            prompt_id="wf",
            number=9,
            client_id=None,
            graph={"1": {"class_type": "Note", "inputs": {"text": "é" * 10}}},
            extra_data={"extra_pnginfo": {"workflow": {"id": "w-1"}}},
            outputs_to_execute=[],
            plan={"jobs": []},
            job_ids=[],
            request_hash="h",
            created_at=utcnow(),
        ),
        [],
    )
    sizes = comfy.body_sizes("acme", ["wf", "p2", "missing"])
    assert sizes["wf"] > 60 and 0 < sizes["p2"] < 10 and "missing" not in sizes
    assert comfy.workflow_ids("acme", ["wf", "p2"]) == {"wf": "w-1", "p2": None}
    assert comfy.workflow_ids("globex", ["wf"]) == {} and comfy.body_sizes("acme", []) == {}
    comfy.remove_prompt("acme", "p3")
    assert comfy.prompt("acme", "p3") is None

    # Migration 0004 goes down and up again cleanly.
    downgrade(engine, "0003")
    upgrade(engine)
    assert ComfyStore(engine).take("acme", "prompt") == 1
    engine.dispose()


def test_saved_graphs_are_capped_and_finite(http, comfy_server, monkeypatch):
    """A saved workflow's graph is stored and sent back: over the graph caps it is refused (413
    with the reason), and so is a body with NaN/Infinity (no JSON can send those back)."""
    limits = comfy_server.platform.services.config.limits
    monkeypatch.setattr(limits, "max_graph_bytes", 4000)
    monkeypatch.setattr(limits, "max_graph_nodes", 10)
    big = workflow_body()
    big["graph"]["6"]["inputs"]["text"] = "x" * 4000
    answer = http.put("/v1/workflows/too-big", json=big)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "graph_too_large"
    assert answer.json()["error"]["param"] == "graph"
    many = workflow_body()
    many["graph"].update({f"n{i}": {"class_type": "Note", "inputs": {}} for i in range(10)})
    answer = http.put("/v1/workflows/too-many", json=many)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_many_nodes"

    body = json.dumps(workflow_body()).replace('"default": 2', '"default": NaN')
    answer = http.put("/v1/workflows/nan", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "non_finite_number"
    assert http.get("/v1/workflows/nan").status_code == 404
