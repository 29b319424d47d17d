"""UI-format workflows → API format, by the rules of ComfyUI's frontend (graphToPrompt), on
small hand-built graphs and on ComfyUI's official templates as the PyPI package ships them."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from zimage_platform.workflows import WorkflowFormatError, build_catalog, object_info, ui_to_api

TEMPLATES = resources.files("comfyui_workflow_templates_json") / "templates"


def template(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def info(config):
    return object_info(build_catalog(config, None, {"photo.png": (64, 64)}))


def node(id_, type_, widgets=None, inputs=(), outputs=(), mode=0, **extra) -> dict:
    return {
        "id": id_,
        "type": type_,
        "mode": mode,
        "inputs": [
            {"name": n, "type": t, "link": link, **({"widget": {"name": n}} if w else {})} for n, t, link, w in inputs
        ],
        "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
        "widgets_values": widgets if widgets is not None else [],
        **extra,
    }


def classic(**changes) -> dict:
    """The default text-to-image graph as the editor saves it (links: [id, from, slot, to, slot, type])."""
    nodes = [
        node(
            4,
            "CheckpointLoaderSimple",
            ["z_image_turbo.safetensors"],
            (),
            [("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [3, 5]), ("VAE", "VAE", [8])],
        ),
        node(5, "EmptyLatentImage", [64, 64, 1], (), [("LATENT", "LATENT", [2])]),
        node(6, "CLIPTextEncode", ["a fox"], [("clip", "CLIP", 3, False)], [("CONDITIONING", "CONDITIONING", [4])]),
        node(7, "CLIPTextEncode", ["blurry"], [("clip", "CLIP", 5, False)], [("CONDITIONING", "CONDITIONING", [6])]),
        node(
            3,
            "KSampler",
            [156680208700286, "randomize", 4, 1, "euler", "simple", 1],
            [
                ("model", "MODEL", 1, False),
                ("positive", "CONDITIONING", 4, False),
                ("negative", "CONDITIONING", 6, False),
                ("latent_image", "LATENT", 2, False),
            ],
            [("LATENT", "LATENT", [7])],
        ),
        node(
            8, "VAEDecode", [], [("samples", "LATENT", 7, False), ("vae", "VAE", 8, False)], [("IMAGE", "IMAGE", [9])]
        ),
        node(9, "SaveImage", ["ComfyUI"], [("images", "IMAGE", 9, False)]),
        node(10, "Note", ["a note"]),
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 5, 0, 3, 3, "LATENT"],
        [3, 4, 1, 6, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 4, 1, 7, 0, "CLIP"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 3, 0, 8, 0, "LATENT"],
        [8, 4, 2, 8, 1, "VAE"],
        [9, 8, 0, 9, 0, "IMAGE"],
    ]
    return {"nodes": nodes, "links": links, **changes}


def test_widgets_links_and_ui_only_values(info):
    api = ui_to_api(classic(), info)
    assert list(api) == ["4", "5", "6", "7", "3", "8", "9"]  # the frontend's order; the note is dropped
    assert api["3"] == {
        "inputs": {
            "seed": 156680208700286,  # the control_after_generate value ("randomize") is UI-only
            "steps": 4,
            "cfg": 1,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
        "class_type": "KSampler",
        "_meta": {"title": "KSampler"},
    }
    assert api["8"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    assert api["9"]["inputs"] == {"filename_prefix": "ComfyUI", "images": ["8", 0]}


def test_missing_trailing_values_take_the_defaults_and_dict_values_go_by_name(info):
    workflow = classic()
    workflow["nodes"][4]["widgets_values"] = [7, "fixed", 4]  # an older save: cfg ... denoise missing
    workflow["nodes"][1]["widgets_values"] = {"width": 128, "height": 64, "batch_size": 2}
    api = ui_to_api(workflow, info)
    assert api["3"]["inputs"]["cfg"] == 1.0 and api["3"]["inputs"]["denoise"] == 1.0
    assert api["3"]["inputs"]["sampler_name"] == "euler" and api["3"]["inputs"]["seed"] == 7
    assert api["5"]["inputs"] == {"width": 128, "height": 64, "batch_size": 2}


def test_bypass_routes_by_type_and_mute_drops_the_node_and_its_links(info):
    workflow = classic()
    # A bypassed ModelSamplingAuraFlow between the loader and the sampler: the sampler gets the loader.
    workflow["nodes"].append(
        node(11, "ModelSamplingAuraFlow", [3], [("model", "MODEL", 10, False)], [("MODEL", "MODEL", [11])], mode=4)
    )
    workflow["nodes"][0]["outputs"][0]["links"] = [10]
    workflow["nodes"][4]["inputs"][0]["link"] = 11
    workflow["links"] += [[10, 4, 0, 11, 0, "MODEL"], [11, 11, 0, 3, 0, "MODEL"]]
    api = ui_to_api(workflow, info)
    assert "11" not in api and api["3"]["inputs"]["model"] == ["4", 0]
    workflow["nodes"][-1]["mode"] = 0
    assert ui_to_api(workflow, info)["3"]["inputs"]["model"] == ["11", 0]
    workflow["nodes"][-1]["mode"] = 2  # muted: left out, and so is the link to it
    api = ui_to_api(workflow, info)
    assert "11" not in api and "model" not in api["3"]["inputs"]


def test_reroutes_and_primitive_nodes_are_inlined(info):
    workflow = classic()
    workflow["nodes"] += [
        node(12, "Reroute", [], [("", "*", 20, False)], [("", "VAE", [21])]),
        node(13, "PrimitiveNode", [777, "fixed"], [], [("INT", "INT", [22])]),
    ]
    workflow["nodes"][0]["outputs"][2]["links"] = [20]
    workflow["nodes"][5]["inputs"][1]["link"] = 21
    workflow["nodes"][4]["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 22})
    workflow["links"] += [[20, 4, 2, 12, 0, "VAE"], [21, 12, 0, 8, 1, "VAE"], [22, 13, 0, 3, 4, "INT"]]
    api = ui_to_api(workflow, info)
    assert "12" not in api and "13" not in api
    assert api["8"]["inputs"]["vae"] == ["4", 2] and api["3"]["inputs"]["seed"] == 777


def test_subgraphs_expand_with_path_ids(info):
    """The Z-Image Turbo template: a subgraph instance (57) whose inputs are unlinked, so every
    inner widget keeps its own value; inner ids become "57:<id>"."""
    api = ui_to_api(template("image_z_image_turbo"), info)
    assert set(api) == {"9", *(f"57:{n}" for n in (30, 29, 33, 8, 28, 27, 13, 11, 3))}
    assert api["9"]["inputs"]["images"] == ["57:8", 0]
    assert api["57:3"]["inputs"] == {
        "seed": 0,
        "steps": 8,
        "cfg": 1,
        "sampler_name": "res_multistep",
        "scheduler": "simple",
        "denoise": 1,
        "model": ["57:11", 0],
        "positive": ["57:27", 0],
        "negative": ["57:33", 0],
        "latent_image": ["57:13", 0],
    }
    assert api["57:28"]["inputs"] == {"unet_name": "z_image_turbo_bf16.safetensors", "weight_dtype": "default"}
    assert api["57:30"]["inputs"] == {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2", "device": "default"}


def test_a_linked_subgraph_input_follows_the_outer_link(info):
    """The Base template feeds the subgraph's width/height from a ResolutionSelector outside it."""
    api = ui_to_api(template("image_z_image"), info)
    assert next(iter(api)) == "94"  # no inputs: first in the frontend's order
    assert api["76:68"]["inputs"] == {"width": ["94", 0], "height": ["94", 1], "batch_size": 1}
    assert api["94"]["inputs"] == {"aspect_ratio": "1:1 (Square)", "megapixels": 1, "multiple": 8, "minimum": 256}
    assert api["95"]["inputs"] == {
        "filename_prefix": "Z_image_base",
        "format": "png",
        "format.bit_depth": "8-bit",
        "format.input_color_space": "sRGB",
        "images": ["76:65", 0],
    }
    assert api["76:69"]["inputs"]["seed"] == 677498465340151 and api["76:69"]["inputs"]["cfg"] == 4


def test_a_host_value_for_a_promoted_widget_wins(info):
    """Older saves keep a subgraph's promoted widget values on the instance (one per input)."""
    workflow = template("image_z_image_turbo")
    instance = next(n for n in workflow["nodes"] if n["id"] == 57)
    assert instance["inputs"][0]["name"] == "text" and instance["inputs"][0]["link"] is None
    instance["widgets_values"] = ["a lighthouse at dusk"]
    assert ui_to_api(workflow, info)["57:27"]["inputs"]["text"] == "a lighthouse at dusk"


def test_unknown_nodes_are_kept_for_the_server_to_refuse(info):
    api = ui_to_api(template("image_z_image_turbo_fun_union_controlnet"), info)
    assert api["57"] == {"inputs": {"image": ["58", 0]}, "class_type": "Canny", "_meta": {"title": "Canny"}}
    assert api["70:60"]["class_type"] == "QwenImageDiffsynthControlnet"
    assert "62" not in api and api["57"]["inputs"]["image"] == ["58", 0]  # 62 is bypassed: Canny reads the upload


def test_malformed_workflows_are_refused_with_a_reason(info):
    with pytest.raises(WorkflowFormatError) as err:
        ui_to_api({"3": {"class_type": "KSampler", "inputs": {}}}, info)
    assert err.value.code == "invalid_workflow"
    dangling = classic()
    dangling["nodes"][5]["inputs"][1]["link"] = 99
    with pytest.raises(WorkflowFormatError, match="link 99"):
        ui_to_api(dangling, info)


def test_an_empty_choice_list_has_no_default(info):
    """A tenant without uploads: LoadImage's list is empty; the saved value is still sent."""
    empty = {**info, "LoadImage": {**info["LoadImage"], "input": {"required": {"image": [[], {"image_upload": True}]}}}}
    api = ui_to_api(template("image_z_image_turbo_fun_union_controlnet"), empty)
    assert api["58"]["inputs"] == {"image": "image_z_image_turbo_fun_union_controlnet_input_image.png"}
    workflow = template("image_z_image_turbo_fun_union_controlnet")
    next(n for n in workflow["nodes"] if n["id"] == 58)["widgets_values"] = []
    assert ui_to_api(workflow, empty)["58"]["inputs"] == {"image": None}
