"""ComfyUI's official Z-Image templates, as PyPI ``comfyui-workflow-templates-json`` ships them,
converted to API format the way ComfyUI's frontend converts them and POSTed to ``/prompt``
unchanged: they run to the end at their own size and steps, or fail only on nodes the platform
does not have, with ComfyUI's own error. Their images carry ComfyUI's ``prompt`` and
``workflow`` PNG text chunks."""

from __future__ import annotations

import io
import json
import time
from importlib import resources

import comfy_client
import httpx
import pytest
from PIL import Image

from zimage_platform.workflows import build_catalog, object_info, ui_to_api

TEMPLATES = resources.files("comfyui_workflow_templates_json") / "templates"
#: Template → its output node's class and file name prefix (all at the template's 1024x1024).
RUNS = {
    "image_z_image_turbo": ("9", "z-image-turbo_", "_.png"),
    "image_z_image_turbo_int8": ("9", "z-image-turbo_", "_.png"),
    "image_z_image": ("95", "Z_image_base_", ".png"),
    "image_z_image_int8": ("95", "Z_image_base_int8_", ".png"),
}
#: Template → the first node the platform lacks, as ComfyUI names it.
REFUSED = {
    "image_z_image_turbo_fun_union_controlnet": ("Canny", "#57"),
    "utility_z_image_turbo_2k_upscaler.app": ("ImageUpscaleWithModel", "#87:79"),
}


def template(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def http(comfy_server, comfy_keys):
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["acme"]}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def info(http):
    return http.get("/object_info").json()


def history(http, prompt_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (entry := http.get(f"/history/{prompt_id}").json()) == {}:
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish in {timeout} s"
        time.sleep(0.2)
    return entry[prompt_id]


def test_the_server_describes_what_the_converter_needs(info, comfy_config):
    """The frontend converts with the server's /object_info; the package's own description gives
    the same answer (what the saved-workflows API and the frontend engineer use)."""
    workflow = template("image_z_image")
    local = object_info(build_catalog(comfy_config, None))
    assert ui_to_api(workflow, info) == ui_to_api(workflow, local)


@pytest.mark.slow
def test_official_templates_run_unchanged_at_their_own_size(http, info):
    """All four are queued first, so Turbo's two and Base's two can share engine batches."""
    submitted = {}
    for name in RUNS:
        workflow = template(name)
        prompt = ui_to_api(workflow, info)
        body = {"prompt": prompt, "client_id": "templates", "extra_data": {"extra_pnginfo": {"workflow": workflow}}}
        response = http.post("/prompt", json=body)
        assert response.status_code == 200, f"{name}: {response.text}"
        assert response.json()["node_errors"] == {}
        submitted[name] = (response.json()["prompt_id"], prompt, workflow)
    for name, (prompt_id, prompt, workflow) in submitted.items():
        entry = history(http, prompt_id, timeout=600)
        assert entry["status"]["status_str"] == "success", name
        node, prefix, suffix = RUNS[name]
        (image,) = entry["outputs"][node]["images"]
        assert image["filename"].startswith(prefix) and image["filename"].endswith(suffix), image
        data = http.get("/view", params=image).content
        with Image.open(io.BytesIO(data)) as png:
            assert png.size == (1024, 1024)
            # An image dragged back into ComfyUI restores the prompt and the workflow.
            assert json.loads(png.text["prompt"]) == prompt
            assert json.loads(png.text["workflow"]) == workflow
    jobs = {j["params"]["prompt"][:40]: j for j in http.get("/v1/jobs").json()["data"]}
    base = next(j for p, j in jobs.items() if p.startswith("A fashion photography work"))
    # The template's 15-digit seed, its res_multistep sampler, 25 steps with cfg 4 (guidance 3).
    assert base["images"][0]["seed"] == 677498465340151 and base["variant"] == "base"
    assert "png_text" not in base["params"]  # carried to the engine, not shown
    assert (base["params"]["sampler"], base["params"]["steps"], base["params"]["guidance"]) == (
        "res_multistep",
        25,
        3.0,
    )


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_templates_with_nodes_the_platform_lacks_get_comfyuis_error(http, info, name):
    workflow = template(name)
    response = http.post("/prompt", json={"prompt": ui_to_api(workflow, info), "client_id": "templates"})
    node_class, node_id = REFUSED[name]
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "type": "invalid_prompt",
            "message": f"Cannot execute because node {node_class} does not exist.",
            "details": f"Node ID '{node_id}'",
            "extra_info": {},
        },
        "node_errors": {},
    }


def test_a_size_outside_the_buckets_runs_as_asked(http):
    prompt = json.loads(comfy_client.prompt_text)
    prompt["5"]["inputs"].update(width=96, height=160)
    prompt["3"]["inputs"].update(steps=2, seed=123456789012345)
    prompt["3"]["inputs"]["control_after_generate"] = "randomize"  # UI-only: ignored, as ComfyUI ignores it
    response = http.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 200 and response.json()["node_errors"] == {}, response.text
    entry = history(http, response.json()["prompt_id"], timeout=120)
    (image,) = entry["outputs"]["9"]["images"]
    with Image.open(io.BytesIO(http.get("/view", params=image).content)) as png:
        assert png.size == (96, 160)
        assert json.loads(png.text["prompt"]) == prompt and "workflow" not in png.text


def test_a_ui_format_workflow_can_be_saved_and_run(http, info):
    """PUT /v1/workflows accepts ComfyUI's UI format: the API graph is stored, its subgraph
    nodes are named as the frontend names them, and parameters point at those ids."""
    workflow = template("image_z_image_turbo")
    body = {
        "graph": workflow,
        "parameters": {
            "prompt": ["57:27", "inputs", "text"],
            "size": {"type": "size", "width": ["57:13", "inputs", "width"], "height": ["57:13", "inputs", "height"]},
            "steps": ["57:3", "inputs", "steps"],
        },
    }
    saved = http.put("/v1/workflows/z-image-turbo-template", json=body)
    assert saved.status_code == 201, saved.text
    assert saved.json()["graph"] == ui_to_api(workflow, info)
    run = http.post(
        "/v1/workflows/z-image-turbo-template/run",
        json={"parameters": {"prompt": "a lighthouse", "size": "64x64", "steps": 2}},
    )
    assert run.status_code == 202, run.text
    job = run.json()
    assert (job["params"]["sampler"], job["params"]["size"], job["variant"]) == ("res_multistep", "64x64", "turbo")
    broken = {**body, "graph": {**workflow, "links": [[62, 57, 0, 9, 0, "IMAGE"]], "nodes": workflow["nodes"]}}
    broken["graph"]["nodes"] = [dict(n) for n in workflow["nodes"]]
    broken["graph"]["nodes"][1] = {**workflow["nodes"][1], "inputs": [{"name": "images", "type": "IMAGE", "link": 99}]}
    refused = http.put("/v1/workflows/broken", json=broken)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_workflow"
