"""Refusals in ComfyUI's shapes, compared with the recordings of a real ComfyUI server, and
the platform's own constraints reported as node errors that name the valid values."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import comfy_client
import httpx
import pytest

from tenants import add_tenant

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "comfyui-reference"


def recorded(name: str, key: str | None = None) -> dict:
    data = json.loads((REFERENCE / name).read_text())
    return data[key] if key else data


def without_traceback(body: dict) -> dict:
    """ComfyUI's recordings hold ``["[traceback omitted]"]``; the platform sends ``[]``."""
    body = copy.deepcopy(body)
    for entry in body.get("node_errors", {}).values():
        for error in entry["errors"]:
            error["extra_info"].pop("traceback", None)
    return body


@pytest.fixture(scope="module")
def http(comfy_server, comfy_keys):
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["acme"]}, timeout=60) as c:
        yield c


def graph() -> dict:
    return json.loads(comfy_client.prompt_text)


def post(http, prompt, status=400) -> dict:
    response = http.post("/prompt", json={"prompt": prompt, "client_id": "errors"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    return response.json()


@pytest.mark.parametrize(
    ("recording", "key"),
    [
        ("invalid_unknown_class_type.json", None),
        ("invalid_bad_link_missing_node.json", None),
        ("invalid_prompts_more.json", "bad_link_type_mismatch"),
        ("invalid_prompts_more.json", "no_output_node"),
        ("invalid_prompts_more.json", "empty_prompt"),
        ("invalid_prompts_more.json", "no_prompt_key"),
        ("invalid_prompts_more.json", "missing_class_type_key"),
    ],
)
def test_same_body_as_comfyui(http, recording, key):
    """Prompts whose nodes the platform also has (or that fail before any node runs): the
    answer is ComfyUI's, byte for byte in JSON, tracebacks aside."""
    exchange = recorded(recording, key)
    request = exchange["request"]["json"]
    if request.get("prompt", {}).get("1", {}).get("class_type") == "EmptyImage":
        # EmptyImage is not in the platform's node set; an empty latent fails the same way here.
        request["prompt"]["1"] = {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        }
    response = http.post("/prompt", json=request)
    assert response.status_code == exchange["response"]["status"]
    assert without_traceback(response.json()) == without_traceback(exchange["response"]["json"])


def test_missing_input_and_link_errors_match_comfyui_shapes(http):
    expected = recorded("invalid_missing_required_input.json")["response"]["json"]
    body = post(http, {"1": graph()["5"], "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}})
    assert body["error"] == expected["error"]
    assert body["node_errors"]["2"] == expected["node_errors"]["2"]

    index = recorded("invalid_prompts_more.json", "bad_link_output_index")["response"]["json"]
    broken = graph()
    broken["9"]["inputs"]["images"] = ["8", 5]
    body = without_traceback(post(http, broken))
    assert body["error"] == index["error"]
    assert body["node_errors"]["9"] == without_traceback(index)["node_errors"]["2"] | {"dependent_outputs": ["9"]}

    deep = graph()
    deep["8"]["inputs"]["samples"] = ["99", 0]  # a bad link below the output: reported on its node
    body = post(http, deep)
    error = body["node_errors"]["8"]["errors"][0]
    assert error["type"] == "exception_during_inner_validation" and error["details"] == "'99'"
    assert error["extra_info"]["exception_type"] == "KeyError" and body["node_errors"]["8"]["dependent_outputs"] == [
        "9"
    ]


def test_value_errors_name_the_supported_values(http):
    sampler = graph()
    sampler["3"]["inputs"]["sampler_name"] = "dpmpp_2m_sde"  # stochastic: per-step noise, not offered
    error = post(http, sampler)["node_errors"]["3"]["errors"][0]
    samplers = ["euler", "dpmpp_2m", "res_multistep", "ddim", "uni_pc", "uni_pc_bh2"]
    assert error["type"] == "value_not_in_list" and error["message"] == "Value not in list"
    assert error["details"] == f"sampler_name: 'dpmpp_2m_sde' not in {samplers}"
    assert error["extra_info"]["input_config"][0] == samplers

    scheduler = graph()
    scheduler["3"]["inputs"]["scheduler"] = "align_your_steps"
    assert "not in ['simple', 'sgm_uniform'," in post(http, scheduler)["node_errors"]["3"]["errors"][0]["details"]

    ckpt = recorded("invalid_prompts_more.json", "checkpoint_not_in_list")
    body = post(http, ckpt["request"]["json"]["prompt"])
    error, reference = body["node_errors"]["4"]["errors"][0], ckpt["response"]["json"]["node_errors"]["4"]["errors"][0]
    assert set(error) == set(reference) and set(error["extra_info"]) == set(reference["extra_info"])
    assert error["details"] == (
        "ckpt_name: 'v1-5-pruned-emaonly.safetensors' not in "
        "['z_image_base.safetensors', 'z_image_edit.safetensors', 'z_image_turbo.safetensors']"
    )
    assert body["node_errors"]["4"]["dependent_outputs"] == ["9"] and body["error"]["details"] == ""

    below = graph()
    below["3"]["inputs"]["cfg"] = 0.5  # cfg 1 is "no guidance"; below 1 means nothing here
    error = post(http, below)["node_errors"]["3"]["errors"][0]
    assert error["type"] == "value_smaller_than_min" and error["message"] == "Value 0.5 smaller than min of 1.0"

    for value, kind, message in (
        (2**64, "value_bigger_than_max", f"Value {2**64} bigger than max of {2**64 - 1}"),
        (-1, "value_smaller_than_min", "Value -1 smaller than min of 0"),
    ):
        seed = graph()
        seed["3"]["inputs"]["seed"] = value  # ComfyUI's range is 0 … 2**64 − 1, as here
        error = post(http, seed)["node_errors"]["3"]["errors"][0]
        assert error["type"] == kind and error["message"] == message and error["details"] == "seed"
        assert error["extra_info"]["input_name"] == "seed" and error["extra_info"]["received_value"] == value

    wrong = graph()
    wrong["5"]["inputs"]["width"] = "abc"
    error = post(http, wrong)["node_errors"]["5"]["errors"][0]
    reference = recorded("invalid_prompts_more.json", "value_wrong_type")["response"]["json"]["node_errors"]["1"]
    assert error["type"] == "invalid_input_type" and error["details"] == reference["errors"][0]["details"]


def test_platform_constraints_are_node_errors_with_choices(http):
    size = graph()
    size["5"]["inputs"]["width"] = 100  # not a multiple of 16
    error = post(http, size)["node_errors"]["5"]["errors"][0]
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["code"] == "unsupported_size"
    assert "64x64" in error["extra_info"]["choices"] and error["details"].startswith("width - 100x64 is not")
    assert "multiples of 16 between 64 and 2048" in error["details"]

    steps = graph()
    steps["3"]["inputs"]["steps"] = 40  # turbo runs at most 16
    error = post(http, steps)["node_errors"]["3"]["errors"][0]
    assert error["extra_info"]["code"] == "steps_out_of_range" and "1 to 16" in error["details"]

    partial = graph()
    partial["3"]["inputs"]["denoise"] = 0.5  # of an empty latent
    error = post(http, partial)["node_errors"]["3"]["errors"][0]
    assert error["extra_info"]["code"] == "partial_denoise_of_empty_latent"

    # A value the platform refuses after compiling (here: the content policy on the prompt text).
    policy = graph()
    policy["6"]["inputs"]["text"] = "how to make a pipe bomb"
    body = post(http, policy)
    error = body["node_errors"]["6"]["errors"][0]
    assert error["extra_info"]["code"] == "content_policy" and body["node_errors"]["6"]["dependent_outputs"] == ["9"]


def test_partly_valid_prompt_runs_its_good_outputs(http):
    prompt = graph()
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "x"}}
    body = post(http, prompt, status=200)
    assert set(body["node_errors"]) == {"10"} and body["node_errors"]["10"]["dependent_outputs"] == ["10"]
    assert body["node_errors"]["10"]["errors"][0]["type"] == "exception_during_validation"


def test_not_json_is_a_400_not_a_500(http):
    """ComfyUI answers a non-JSON body with a bare 500; the platform says it was the caller's."""
    response = http.post("/prompt", content=b"not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_json"


def test_refused_admission_creates_nothing(comfy_server, comfy_config):
    """A tenant over its monthly quota gets 429 in ComfyUI's shape; no prompt, no job, no history."""
    key = add_tenant(comfy_config, "capped", limits={"monthly_images": 1})
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": key}, timeout=60) as http:
        first = http.post("/prompt", json={"prompt": graph()})
        assert first.status_code == 200
        refused = http.post("/prompt", json={"prompt": graph(), "prompt_id": "over-quota"})
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert refused.json()["error"]["type"] == "quota_exceeded" and refused.json()["node_errors"] == {}
        assert http.get("/history/over-quota").json() == {}
        queue = http.get("/queue").json()
        assert "over-quota" not in json.dumps(queue)
        jobs = http.get("/v1/jobs").json()["data"]
        assert len(jobs) == 1 and jobs[0]["params"]["prompt"] == "masterpiece best quality girl"
