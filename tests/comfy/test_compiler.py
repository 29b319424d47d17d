"""The workflow compiler without a server: what each node chain becomes as platform jobs, what
is refused (and how), and the WebSocket relay's message sequence."""

from __future__ import annotations

import json
import math

import comfy_client
import pytest

from zimage_platform.api.comfy.events import PromptRelay
from zimage_platform.workflows import PromptRejected, build_catalog, compile_prompt
from zimage_platform.workflows.compiler import strength_for
from zimage_platform.workflows.imageops import apply, center_crop


@pytest.fixture(scope="module")
def catalog(config):
    return build_catalog(config, None, {"photo.png": (100, 80), "square.png": (128, 128)})


def base_graph() -> dict:
    return json.loads(comfy_client.prompt_text)


def compile_ok(graph, catalog, config):
    compiled = compile_prompt(graph, catalog, config)
    assert compiled.node_errors == {}
    return compiled


def node_error(graph, catalog, config) -> tuple[str, dict]:
    with pytest.raises(PromptRejected) as err:
        compile_prompt(graph, catalog, config)
    ((node, entry),) = err.value.node_errors.items()
    return node, entry["errors"][0]


def test_strength_runs_exactly_the_asked_steps():
    for total in range(1, 80):
        for run in range(1, total + 1):
            s = strength_for(total, run)
            # The pipeline's own arithmetic (diffusers' img2img): steps run, and "at least one".
            assert total - int(max(total - min(total * s, total), 0)) == run and int(total * s) >= 1
            assert math.isclose(s, run / total, rel_tol=1e-12)


def test_text_to_image(catalog, config):
    (job,) = compile_ok(base_graph(), catalog, config).jobs
    p = job.params
    assert (job.variant, p.size, p.n, p.seed, p.steps, p.guidance, p.sampler) == (
        "turbo",
        "64x64",
        1,
        8566257,
        4,
        0,
        "euler",
    )
    assert (p.prompt, p.negative_prompt, p.shift, p.image, p.hires_from) == (
        "masterpiece best quality girl",
        "bad hands",
        None,
        None,
        None,
    )
    assert job.passes == {"generate": "3"} and job.pre == ["4", "6", "7", "5"] and job.post == ["8"]
    assert job.outputs == ["9"] and job.node_of("size") == ("5", "width") and job.node_of("guidance") == ("3", "cfg")


def test_z_image_template_with_split_loaders(catalog, config):
    """The shape of ComfyUI's Z-Image workflows: UNET, CLIP (lumina2) and VAE loaders, AuraFlow
    shift, a zeroed-out negative with cfg 1, an SD3 latent, primitives feeding widgets."""
    graph = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "z_image_turbo.safetensors", "weight_dtype": "default"},
        },
        "2": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": "z_image_turbo_text_encoder.safetensors", "type": "lumina2"},
        },
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "z_image_turbo_vae.safetensors"}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "5": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a lighthouse at dusk"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["5", 0], "clip": ["2", 0]}},
        "7": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "8": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 3}},
        "9": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "10": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": ["9", 0],
                "steps": 8,
                "cfg": 1.0,
                "sampler_name": "uni_pc",
                "scheduler": "simple",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["8", 0],
                "denoise": 1.0,
            },
        },
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "z-image/%date:yyyy%"}},
    }
    (job,) = compile_ok(graph, catalog, config).jobs
    p = job.params
    assert (p.prompt, p.negative_prompt, p.seed, p.n, p.size, p.shift, p.sampler) == (
        "a lighthouse at dusk",
        "",
        42,
        3,
        "128x128",
        3.0,
        "unipc",
    )
    assert job.node_of("shift") == ("4", "shift") and job.node_of("variant") == ("1", "unet_name")
    assert job.pre[:2] == ["1", "4"] and "5" in job.pre and "9" in job.pre

    graph["10"]["inputs"]["cfg"] = 4.0  # a zeroed-out negative cannot guide
    node, error = node_error(graph, catalog, config)
    assert node == "10" and error["extra_info"]["code"] == "zero_negative_with_cfg"

    graph["10"]["inputs"]["cfg"] = 1.0
    graph["9"] = {"class_type": "PrimitiveString", "inputs": {"value": "42"}}  # STRING into INT
    node, error = node_error(graph, catalog, config)
    assert node == "10" and error["type"] == "return_type_mismatch"


def test_image_to_image_keeps_comfyui_denoise_semantics(catalog, config):
    graph = base_graph()
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "square.png"}}
    graph["21"] = {
        "class_type": "ImageScaleBy",
        "inputs": {"image": ["20", 0], "upscale_method": "area", "scale_by": 0.5},
    }
    graph["22"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["21", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["22", 0], steps=4, denoise=0.3)
    (job,) = compile_ok(graph, catalog, config).jobs
    # ComfyUI: int(4 / 0.3) = 13 step schedule, the last 4 run.
    assert job.params.steps == 13 and int(13 * job.params.strength) == 4
    assert job.image.name == "square.png" and job.image.size == (64, 64) and job.image.ops[0].method == "area"
    assert job.params.n == 1 and job.node_of("image") == ("20", "image")

    advanced = base_graph()
    advanced["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **{k: v for k, v in graph["3"]["inputs"].items() if k not in ("seed", "denoise")},
            "add_noise": "enable",
            "noise_seed": 3,
            "steps": 10,
            "start_at_step": 4,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
        },
    }
    advanced.update({k: graph[k] for k in ("20", "21", "22")})
    (job,) = compile_ok(advanced, catalog, config).jobs
    assert job.params.steps == 10 and int(10 * job.params.strength) == 6 and job.params.seed == 3
    advanced["3"]["inputs"]["end_at_step"] = 8
    node, error = node_error(advanced, catalog, config)
    assert node == "3" and error["extra_info"]["code"] == "leftover_noise_unsupported"

    graph["3"]["inputs"]["denoise"] = 1.0  # a full denoise replaces the image: text to image at its size
    (job,) = compile_ok(graph, catalog, config).jobs
    assert job.image is None and job.params.size == "64x64" and job.params.strength is None


def hires_graph(upscale: dict, second: dict) -> dict:
    graph = base_graph()
    graph["10"] = upscale
    graph["11"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"], "latent_image": ["10", 0], **second}}
    graph["8"]["inputs"]["samples"] = ["11", 0]
    return graph


def test_latent_upscale_chain_is_hires_fix(catalog, config):
    graph = hires_graph(
        {
            "class_type": "LatentUpscaleBy",
            "inputs": {"samples": ["3", 0], "upscale_method": "bislerp", "scale_by": 2.0},
        },
        {"steps": 2, "denoise": 0.5},
    )
    (job,) = compile_ok(graph, catalog, config).jobs
    p = job.params
    assert (p.size, p.hires_from, p.steps) == ("128x128", "64x64", 4) and int(4 * p.hires_denoise) == 2
    assert job.passes == {"base": "3", "hires": "11"} and job.between == ["10"] and job.sampler == "11"

    graph["11"]["inputs"]["steps"] = 4  # runs the last 4 of 8: not the first pass's 4-step schedule
    node, error = node_error(graph, catalog, config)
    assert node == "11" and error["extra_info"]["code"] == "hires_steps_mismatch" and "steps 2" in error["details"]

    graph["11"]["inputs"].update(steps=2, seed=99)
    node, error = node_error(graph, catalog, config)
    assert (
        node == "11" and error["extra_info"]["code"] == "hires_mismatch" and error["extra_info"]["input_name"] == "seed"
    )


def test_pixel_upscale_chain_is_hires_fix_with_lanczos_only(catalog, config):
    graph = base_graph()
    graph["30"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    graph["31"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["30", 0], "upscale_method": "lanczos", "width": 256, "height": 256, "crop": "disabled"},
    }
    graph["32"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["31", 0], "vae": ["4", 2]}}
    graph["11"] = {
        "class_type": "KSampler",
        "inputs": {**graph["3"]["inputs"], "latent_image": ["32", 0], "steps": 3, "denoise": 0.75},
    }
    graph["8"]["inputs"]["samples"] = ["11", 0]
    (job,) = compile_ok(graph, catalog, config).jobs
    assert (job.params.size, job.params.hires_from) == ("256x256", "64x64") and job.between == ["30", "31", "32"]
    graph["31"]["inputs"]["upscale_method"] = "bilinear"
    node, error = node_error(graph, catalog, config)
    assert node == "31" and error["extra_info"]["choices"] == ["lanczos"]


def test_outputs_share_or_split_jobs(catalog, config):
    graph = base_graph()
    graph["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    compiled = compile_ok(graph, catalog, config)
    assert len(compiled.jobs) == 1 and compiled.jobs[0].outputs == ["9", "10"]
    graph["13"] = {"class_type": "KSampler", "inputs": {**graph["3"]["inputs"], "seed": 2}}
    graph["14"] = {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["4", 2]}}
    graph["10"]["inputs"]["images"] = ["14", 0]
    assert [j.outputs for j in compile_ok(graph, catalog, config).jobs] == [["9"], ["10"]]


def test_unsupported_chains_are_refused_where_they_are(catalog, config):
    post = base_graph()
    post["20"] = {
        "class_type": "ImageScaleBy",
        "inputs": {"image": ["8", 0], "upscale_method": "lanczos", "scale_by": 2.0},
    }
    post["9"]["inputs"]["images"] = ["20", 0]
    node, error = node_error(post, catalog, config)
    assert node == "20" and error["extra_info"]["code"] == "post_scale_unsupported"

    passthrough = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "square.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    node, error = node_error(passthrough, catalog, config)
    assert node == "2" and error["extra_info"]["code"] == "no_generation"

    escape = base_graph()
    escape["9"]["inputs"]["filename_prefix"] = "../outside"
    node, error = node_error(escape, catalog, config)
    assert node == "9" and error["extra_info"]["code"] == "invalid_filename_prefix"

    cycle = base_graph()
    cycle["6"]["inputs"]["text"] = ["20", 0]
    cycle["20"] = {"class_type": "PrimitiveString", "inputs": {"value": ["20", 0]}}
    with pytest.raises(PromptRejected) as err:
        compile_prompt(cycle, catalog, config)
    assert any(e["type"] == "dependency_cycle" for n in err.value.node_errors.values() for e in n["errors"])


def test_components_must_come_from_the_models_checkpoint(config):
    base = config.variant("base").model_copy(update={"checkpoint": "/models/Z-Image-Base"})
    other = config.model_copy(update={"variants": {**config.variants, "base": base}})
    catalog = build_catalog(other, None)
    graph = base_graph()
    graph["40"] = {"class_type": "VAELoader", "inputs": {"vae_name": "z_image_base_vae.safetensors"}}
    graph["8"]["inputs"]["vae"] = ["40", 0]
    node, error = node_error(graph, catalog, other)
    assert node == "40" and error["extra_info"]["code"] == "component_mismatch"
    assert "z_image_base_vae.safetensors" not in error["extra_info"]["choices"]


def test_image_ops_crop_like_comfyui():
    from PIL import Image

    from zimage_platform.workflows.compiler import ImageOp

    image = Image.new("RGB", (100, 80))
    assert center_crop(image, 64, 64).size == (80, 80)
    assert apply(image, [ImageOp("1", "bicubic", 64, 64, "center")]).size == (64, 64)
    assert apply(image, [ImageOp("1", "lanczos", 50, 40)]).size == (50, 40)


def test_relay_sequence_for_a_hires_job():
    plan = {
        "jobs": [
            {
                "job_id": "job_1",
                "sampler": "11",
                "passes": {"base": "3", "hires": "11"},
                "pre": ["4", "6", "7", "5"],
                "between": ["10"],
                "post": ["8"],
                "outputs": {"9": [{"filename": "x_00001_.png", "subfolder": "", "type": "output", "index": 0}]},
            }
        ],
        "class_types": {},
    }
    relay = PromptRelay("p", plan)
    events = [
        {"type": "queued"},
        {"type": "started"},
        {"type": "progress", "step": 1, "total": 2, "pass_": "base"},
        {"type": "progress", "step": 2, "total": 2, "pass_": "base"},
        {"type": "progress", "step": 1, "total": 1, "pass_": "hires"},
        {"type": "succeeded"},
    ]
    messages = [m for e in events for m in relay.on_event(0, e)]
    messages += relay.finish({"type": "execution_success", "data": {"prompt_id": "p"}}, remaining=0)
    trail = [
        (m["type"], m["data"].get("node"), m["data"].get("value"))
        for m in messages
        if m["type"] in ("executing", "progress", "executed")
    ]
    assert trail == [
        ("executing", "4", None),
        ("executing", "6", None),
        ("executing", "7", None),
        ("executing", "5", None),
        ("executing", "3", None),
        ("progress", "3", 1),
        ("progress", "3", 2),
        ("executing", "10", None),
        ("executing", "11", None),
        ("progress", "11", 1),
        ("executing", "8", None),
        ("executing", "9", None),
        ("executed", "9", None),
        ("executing", None, None),
    ]
    assert [m["type"] for m in messages[:2]] == ["execution_start", "execution_cached"]
    assert relay.current_node(0) == "9"


def test_prompt_state_and_history_from_job_rows():
    """A prompt's queue state and history entry come from its jobs' rows: success, a failure
    (``execution_error`` with the job's reason code), and jobs that never got written."""
    from datetime import timedelta

    from zimage_platform.api.comfy.serving import history_entry, prompt_view, terminal_message
    from zimage_platform.db import utcnow
    from zimage_platform.scheduling.models import JobImageRow, JobRow
    from zimage_platform.workflows.models import ComfyPromptRow

    now = utcnow()
    plan_job = {
        "job_id": "job_a",
        "sampler": "3",
        "passes": {"generate": "3"},
        "pre": ["4", "6", "7", "5"],
        "between": [],
        "post": ["8"],
        "outputs": {"9": [{"filename": "x_00001_.png", "subfolder": "", "type": "output", "index": 0}]},
    }
    prompt = ComfyPromptRow(
        tenant_id="acme",
        prompt_id="p",
        number=3,
        client_id="c",
        graph={"3": {}},
        extra_data={"client_id": "c"},
        outputs_to_execute=["9"],
        plan={"jobs": [plan_job], "class_types": {"3": "KSampler"}},
        job_ids=["job_a"],
        request_hash="h",
        queue_deleted=False,
        history_deleted=False,
        created_at=now - timedelta(seconds=5),
    )

    def job(status, **fields):
        image = JobImageRow(index=0, seed=1, status="done" if status == "succeeded" else "failed")
        return JobRow(
            id="job_a", status=status, started_at=now - timedelta(seconds=4), finished_at=now, images=[image], **fields
        )

    assert prompt_view(prompt, {"job_a": JobRow(id="job_a", status="queued", images=[])}).state == "pending"
    assert prompt_view(prompt, {}).state == "pending"  # its POST is still queueing the job
    view = prompt_view(prompt, {"job_a": job("succeeded")})
    entry = history_entry(view)
    assert view.state == "success" and entry["prompt"] == [3, "p", {"3": {}}, {"client_id": "c"}, ["9"]]
    assert entry["outputs"] == {"9": {"images": [{"filename": "x_00001_.png", "subfolder": "", "type": "output"}]}}
    assert entry["status"]["status_str"] == "success" and entry["meta"]["9"]["node_id"] == "9"

    failed = prompt_view(prompt, {"job_a": job("failed", error_code="engine_failed", error_message="out of memory")})
    message = terminal_message(failed)
    assert message["type"] == "execution_error"
    data = message["data"]
    assert (data["node_id"], data["node_type"], data["exception_type"], data["exception_message"]) == (
        "3",
        "KSampler",
        "engine_failed",
        "out of memory",
    )
    assert data["executed"] == ["5", "7", "6", "4"]
    entry = history_entry(failed)
    assert entry["outputs"] == {} and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_error"

    prompt.created_at = now - timedelta(minutes=5)  # never written, long after its POST
    lost = prompt_view(prompt, {})
    assert lost.state == "error" and terminal_message(lost)["data"]["exception_type"] == "submission_lost"
