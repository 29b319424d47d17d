"""GET /object_info and the other informational routes, against ComfyUI's recorded shapes."""

from __future__ import annotations

import httpx
import pytest
from test_errors import recorded

from zimage_platform.workflows import NODES

REQUIRED_NODES = {
    "CheckpointLoaderSimple",
    "UNETLoader",
    "CLIPLoader",
    "VAELoader",
    "ModelSamplingAuraFlow",
    "CLIPTextEncode",
    "ConditioningZeroOut",
    "EmptyLatentImage",
    "EmptySD3LatentImage",
    "KSampler",
    "KSamplerAdvanced",
    "VAEDecode",
    "VAEEncode",
    "LoadImage",
    "ImageScale",
    "ImageScaleBy",
    "LatentUpscale",
    "LatentUpscaleBy",
    "SaveImage",
    "PreviewImage",
    "PrimitiveInt",
    "PrimitiveFloat",
    "PrimitiveString",
    "PrimitiveStringMultiline",
    "PrimitiveBoolean",
    # Newer than ComfyUI 0.3.64 (the recording): in the official Z-Image Base template.
    "ResolutionSelector",
    "SaveImageAdvanced",
}
NEWER_THAN_RECORDING = {"ResolutionSelector", "SaveImageAdvanced"}


@pytest.fixture(scope="module")
def http(comfy_server, comfy_keys):
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": comfy_keys["acme"]}, timeout=60) as c:
        yield c


def shape(value):
    """Keys and value kinds, recursively (lists of choices compared by kind only)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return ["list", *(shape(v) for v in value if not isinstance(v, str))]
    return type(value).__name__


def test_every_class_and_the_recorded_shape(http):
    response = http.get("/object_info")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json; charset=utf-8"
    info = response.json()
    assert set(info) == REQUIRED_NODES == set(NODES)
    summary = recorded("get_object_info_all_summary.json")["response"]["summary"]["node_classes_sorted"]
    assert set(info) - NEWER_THAN_RECORDING <= set(summary)  # every class exists in ComfyUI under that name
    for node in info.values():
        assert set(node) >= {"input", "input_order", "output", "output_is_list", "output_name", "name"}
        assert node["input_order"] == {section: list(inputs) for section, inputs in node["input"].items()}
        assert len(node["output"]) == len(node["output_is_list"]) == len(node["output_name"])


def test_same_as_comfyui_where_nothing_differs(http):
    # ImageScale publishes exactly what ComfyUI 0.3.64 does.
    expected = recorded("get_object_info_ImageScale.json")["response"]["json"]
    assert http.get("/object_info/ImageScale").json() == expected
    assert http.get("/api/object_info/ImageScale").json() == expected
    assert http.get("/object_info/NoSuchNode").json() == {}


@pytest.mark.parametrize("node", ["SaveImage", "PreviewImage", "KSampler", "LoadImage"])
def test_same_shape_as_comfyui(http, node):
    """Same keys, same inputs in the same order, same kinds; the choices are the platform's."""
    ours = http.get(f"/object_info/{node}").json()[node]
    theirs = recorded(f"get_object_info_{node}.json")["response"]["json"][node]
    assert shape(ours) == shape(theirs)
    assert ours["input_order"] == theirs["input_order"] and ours["output"] == theirs["output"]
    assert ours["output_node"] == theirs["output_node"] and ours["category"] == theirs["category"]


def test_choices_are_the_platforms(http):
    ksampler = http.get("/object_info/KSampler").json()["KSampler"]["input"]["required"]
    recorded_samplers = recorded("get_object_info_KSampler.json")["response"]["json"]["KSampler"]["input"]["required"]
    assert ksampler["sampler_name"][0] == ["euler", "dpmpp_2m", "res_multistep", "ddim", "uni_pc", "uni_pc_bh2"]
    assert set(ksampler["sampler_name"][0]) <= set(recorded_samplers["sampler_name"][0])
    # Every ComfyUI schedule, in ComfyUI's order; ComfyUI's seed range.
    assert ksampler["scheduler"][0] == recorded_samplers["scheduler"][0]
    assert ksampler["seed"][1]["max"] == recorded_samplers["seed"][1]["max"] == 2**64 - 1
    loader = http.get("/object_info/CheckpointLoaderSimple").json()["CheckpointLoaderSimple"]
    assert loader["input"]["required"]["ckpt_name"][0] == [
        "z_image_base.safetensors",
        "z_image_edit.safetensors",
        "z_image_turbo.safetensors",
    ]
    assert loader["output"] == ["MODEL", "CLIP", "VAE"]
    clip = http.get("/object_info/CLIPLoader").json()["CLIPLoader"]["input"]
    assert clip["required"]["clip_name"][0] == [
        "qwen_3_4b.safetensors",  # Comfy-Org's files (engines/<variant>.yaml comfy_files), shared by two variants
        "qwen_3_4b_fp8_mixed.safetensors",
        "z_image_base_text_encoder.safetensors",
        "z_image_edit_text_encoder.safetensors",
        "z_image_turbo_text_encoder.safetensors",
    ]
    unet = http.get("/object_info/UNETLoader").json()["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert unet == [
        "z_image_base.safetensors",
        "z_image_bf16.safetensors",
        "z_image_edit.safetensors",
        "z_image_int8_convrot.safetensors",
        "z_image_turbo.safetensors",
        "z_image_turbo_bf16.safetensors",
        "z_image_turbo_fp8_e4m3fn.safetensors",
        "z_image_turbo_int8_convrot.safetensors",
    ]
    assert clip["required"]["type"][0] == ["lumina2"] and "device" in clip["optional"]


def test_informational_routes(http):
    stats = http.get("/system_stats").json()
    reference = recorded("get_system_stats.json")["response"]["json"]
    assert set(reference["system"]) <= set(stats["system"]) and stats["system"]["comfyui_version"] == "0.3.64"
    assert set(reference["devices"][0]) == set(stats["devices"][0])
    assert set(http.get("/features").json()) == set(recorded("get_features.json")["response"]["json"])
    assert http.get("/embeddings").json() == []
    assert http.get("/models").json() == ["checkpoints", "diffusion_models", "text_encoders", "vae"]
    assert http.get("/models/vae").json() == [
        "ae.safetensors",
        "z_image_base_vae.safetensors",
        "z_image_edit_vae.safetensors",
        "z_image_turbo_vae.safetensors",
    ]
    assert http.get("/models/loras").status_code == 404
    assert http.get("/history/00000000-0000-0000-0000-000000000000").json() == {}
    view = http.get("/view", params={"filename": "does_not_exist.png", "type": "output"})
    assert view.status_code == 404 and view.content == b""
    assert http.get("/no/such/route").status_code == 404


def test_allowed_variants_limit_the_model_lists(comfy_server, comfy_config):
    from tenants import add_tenant

    key = add_tenant(comfy_config, "turbo-only", limits={"allowed_variants": ["turbo"]})
    with httpx.Client(base_url=comfy_server.url, headers={"X-API-Key": key}) as other:
        assert other.get("/models/checkpoints").json() == ["z_image_turbo.safetensors"]
