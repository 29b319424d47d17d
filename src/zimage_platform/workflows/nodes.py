"""The ComfyUI node classes the platform understands, described as data.

Each :class:`NodeSpec` carries what ComfyUI's ``/object_info`` publishes for the class (inputs
with types and limits, outputs, names, category), so validation, the compiler and
``/object_info`` read one description. Input lists that depend on the deployment (model names)
or the tenant (uploaded images) are named by a *source* and filled from a :class:`Catalog`.

Where ComfyUI offers choices the platform cannot honour (samplers, schedulers, weight dtypes),
the lists here hold only the supported values: a workflow asking for anything else gets
ComfyUI's own ``value_not_in_list`` node error, which names the supported values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zimage_platform.pipeline.schedules import SCHEDULES

#: ComfyUI's largest width/height.
MAX_RESOLUTION = 16384
#: ComfyUI's seed range, 0 … 2**64 − 1 (``0xffffffffffffffff``); the engines take it as is.
MAX_SEED = 2**64 - 1
#: ComfyUI sampler name → platform sampler (the flow-matching samplers the engines run).
SAMPLERS = {
    "euler": "euler",
    "dpmpp_2m": "dpmpp_2m",
    "res_multistep": "res_multistep",
    "ddim": "ddim",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
}
#: ComfyUI's sigma schedules for the model's flow sampling (pipeline/schedules.py).
SCHEDULERS = SCHEDULES
IMAGE_SCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
LATENT_SCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")
SCALAR_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


@dataclass(frozen=True)
class InputSpec:
    name: str
    #: ``INT``/``FLOAT``/``STRING``/``BOOLEAN`` (widgets), a link type (``MODEL``, ``IMAGE`` ...),
    #: or ``COMBO`` (a choice from ``choices``, or from the catalog list named by ``source``).
    type: str
    options: dict[str, Any] = field(default_factory=dict)
    section: str = "required"
    choices: tuple[str, ...] = ()
    source: str | None = None

    @property
    def is_combo(self) -> bool:
        return self.type == "COMBO"

    @property
    def is_widget(self) -> bool:
        return self.is_combo or self.type in SCALAR_TYPES


@dataclass(frozen=True)
class NodeSpec:
    name: str
    display_name: str
    category: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] | None = None
    description: str = ""
    output_node: bool = False
    python_module: str = "nodes"
    output_tooltips: tuple[str, ...] | None = None
    hidden: tuple[tuple[str, str], ...] = ()
    #: Checked by the node itself (ComfyUI's VALIDATE_INPUTS): no list check, a custom check.
    self_validated: tuple[str, ...] = ()
    #: A node the platform computes while validating (its outputs are values, e.g. a width for
    #: a latent's widget): widget values → outputs.
    evaluate: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)


@dataclass
class Catalog:
    """What this deployment and tenant offer by name: model files and uploaded images."""

    lists: dict[str, list[str]] = field(default_factory=dict)
    #: Diffusion model / checkpoint file name → the (variant, checkpoint) it selects.
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: (folder, file name) → every (variant, checkpoint) that lists it (text encoders and VAEs
    #: may be shared by several variants).
    files: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)
    #: Uploaded image name (``sub/name.png`` or ``name.png``) → (width, height).
    images: dict[str, tuple[int, int]] = field(default_factory=dict)

    def choices(self, spec: InputSpec) -> list[str]:
        return list(spec.choices) if spec.source is None else list(self.lists.get(spec.source, ()))


def _i(name: str, type_: str, section: str = "required", **options: Any) -> InputSpec:
    return InputSpec(name, type_, options, section)


def _combo(name: str, choices: tuple[str, ...] = (), *, source: str | None = None, **options: Any) -> InputSpec:
    section = options.pop("section", "required")
    return InputSpec(name, "COMBO", options, section, choices, source)


_SEED = {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}
#: ComfyUI's ResolutionSelector aspect ratios (comfy_extras/nodes_resolution.py), in its order.
ASPECT_RATIOS = {
    "1:1 (Square)": (1, 1),
    "3:2 (Photo)": (3, 2),
    "4:3 (Standard)": (4, 3),
    "16:9 (Widescreen)": (16, 9),
    "21:9 (Ultrawide)": (21, 9),
    "2:3 (Portrait Photo)": (2, 3),
    "3:4 (Portrait Standard)": (3, 4),
    "9:16 (Portrait Widescreen)": (9, 16),
}


def resolution(values: dict[str, Any]) -> tuple[int, int]:
    """ResolutionSelector: the width and height of ``megapixels`` at ``aspect_ratio``, each a
    multiple of ``multiple``; scaled up (keeping the ratio) when a side is under ``minimum``."""
    rw, rh = ASPECT_RATIOS[values["aspect_ratio"]]
    multiple, minimum = int(values["multiple"]), int(values["minimum"])
    scale = math.sqrt(float(values["megapixels"]) * 1024 * 1024 / (rw * rh))
    width, height = round(rw * scale / multiple) * multiple, round(rh * scale / multiple) * multiple
    if width < minimum or height < minimum:
        step_w, step_h = multiple // math.gcd(rw, multiple), multiple // math.gcd(rh, multiple)
        step = step_w * step_h // math.gcd(step_w, step_h)
        k = math.ceil(math.ceil(max(minimum / rw, minimum / rh)) / step) * step
        width, height = rw * k, rh * k
    return width, height


def _value(values: dict[str, Any]) -> tuple[Any]:
    return (values["value"],)


_STEPS = {"default": 20, "min": 1, "max": 10000}
#: cfg 1 means "no guidance" (ComfyUI skips the negative pass too); below 1 has no platform meaning.
_CFG = {"default": 1.0, "min": 1.0, "max": 100.0, "step": 0.1, "round": 0.01}
_SIZE = {"min": 16, "max": MAX_RESOLUTION, "step": 8}
_BATCH = {"default": 1, "min": 1, "max": 4096}
_SAVE_HIDDEN = (("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO"))

NODES: dict[str, NodeSpec] = {
    spec.name: spec
    for spec in (
        NodeSpec(
            "CheckpointLoaderSimple",
            "Load Checkpoint",
            "loaders",
            (_combo("ckpt_name", source="checkpoints", tooltip="The Z-Image variant to load."),),
            ("MODEL", "CLIP", "VAE"),
            description="Loads a Z-Image variant (its diffusion model, text encoder and VAE).",
            output_tooltips=(
                "The model used for denoising latents.",
                "The text encoder used for encoding text prompts.",
                "The VAE used for encoding and decoding images to and from latent space.",
            ),
        ),
        NodeSpec(
            "UNETLoader",
            "Load Diffusion Model",
            "advanced/loaders",
            (_combo("unet_name", source="diffusion_models"), _combo("weight_dtype", ("default",))),
            ("MODEL",),
            description="Loads a Z-Image diffusion model; its precision is the deployment's (weight_dtype: default).",
        ),
        NodeSpec(
            "CLIPLoader",
            "Load CLIP",
            "advanced/loaders",
            (
                _combo("clip_name", source="text_encoders"),
                _combo("type", ("lumina2",)),
                _combo("device", ("default",), section="optional", advanced=True),
            ),
            ("CLIP",),
            description="Loads the Qwen3 text encoder of a Z-Image variant.",
        ),
        NodeSpec(
            "VAELoader",
            "Load VAE",
            "loaders",
            (_combo("vae_name", source="vae"),),
            ("VAE",),
        ),
        NodeSpec(
            "ModelSamplingAuraFlow",
            "ModelSamplingAuraFlow",
            "advanced/model",
            (
                _i("model", "MODEL"),
                _i("shift", "FLOAT", default=1.73, min=0.0, max=100.0, step=0.01),
            ),
            ("MODEL",),
            python_module="comfy_extras.nodes_model_advanced",
        ),
        NodeSpec(
            "CLIPTextEncode",
            "CLIP Text Encode (Prompt)",
            "conditioning",
            (
                _i("text", "STRING", multiline=True, dynamicPrompts=True, tooltip="The text to be encoded."),
                _i("clip", "CLIP", tooltip="The text encoder used for encoding the text."),
            ),
            ("CONDITIONING",),
            description="Encodes a text prompt into a conditioning that guides the diffusion model.",
            output_tooltips=("A conditioning containing the embedded text used to guide the diffusion model.",),
        ),
        NodeSpec(
            "ConditioningZeroOut",
            "ConditioningZeroOut",
            "advanced/conditioning",
            (_i("conditioning", "CONDITIONING"),),
            ("CONDITIONING",),
        ),
        NodeSpec(
            "EmptyLatentImage",
            "Empty Latent Image",
            "latent",
            (
                _i("width", "INT", default=512, **_SIZE, tooltip="The width of the latent images in pixels."),
                _i("height", "INT", default=512, **_SIZE, tooltip="The height of the latent images in pixels."),
                _i("batch_size", "INT", **_BATCH, tooltip="The number of latent images in the batch."),
            ),
            ("LATENT",),
            description="Create a new batch of empty latent images to be denoised via sampling.",
            output_tooltips=("The empty latent image batch.",),
        ),
        NodeSpec(
            "EmptySD3LatentImage",
            "EmptySD3LatentImage",
            "latent/sd3",
            (
                _i("width", "INT", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                _i("height", "INT", default=1024, min=16, max=MAX_RESOLUTION, step=16),
                _i("batch_size", "INT", **_BATCH),
            ),
            ("LATENT",),
            python_module="comfy_extras.nodes_sd3",
        ),
        NodeSpec(
            "KSampler",
            "KSampler",
            "sampling",
            (
                _i("model", "MODEL", tooltip="The model used for denoising the input latent."),
                _i("seed", "INT", **_SEED, tooltip="The random seed used for creating the noise."),
                _i("steps", "INT", **_STEPS, tooltip="The number of steps used in the denoising process."),
                _i("cfg", "FLOAT", **_CFG, tooltip="Classifier-free guidance scale; 1 disables guidance."),
                _combo("sampler_name", tuple(SAMPLERS), tooltip="The flow-matching sampler."),
                _combo("scheduler", SCHEDULERS, tooltip="The noise schedule (the model's shifted flow schedule)."),
                _i("positive", "CONDITIONING", tooltip="What to include in the image."),
                _i("negative", "CONDITIONING", tooltip="What to exclude from the image."),
                _i("latent_image", "LATENT", tooltip="The latent image to denoise."),
                _i(
                    "denoise",
                    "FLOAT",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="The amount of denoising; below 1 keeps the structure of the input (image to image).",
                ),
            ),
            ("LATENT",),
            description="Uses the provided model, positive and negative conditioning to denoise the latent image.",
            output_tooltips=("The denoised latent.",),
        ),
        NodeSpec(
            "KSamplerAdvanced",
            "KSampler (Advanced)",
            "sampling",
            (
                _i("model", "MODEL"),
                _combo("add_noise", ("enable",)),
                _i("noise_seed", "INT", **_SEED),
                _i("steps", "INT", **_STEPS),
                _i("cfg", "FLOAT", **_CFG),
                _combo("sampler_name", tuple(SAMPLERS)),
                _combo("scheduler", SCHEDULERS),
                _i("positive", "CONDITIONING"),
                _i("negative", "CONDITIONING"),
                _i("latent_image", "LATENT"),
                _i("start_at_step", "INT", default=0, min=0, max=10000),
                _i("end_at_step", "INT", default=10000, min=0, max=10000),
                _combo("return_with_leftover_noise", ("disable",)),
            ),
            ("LATENT",),
        ),
        NodeSpec(
            "VAEDecode",
            "VAE Decode",
            "latent",
            (
                _i("samples", "LATENT", tooltip="The latent to be decoded."),
                _i("vae", "VAE", tooltip="The VAE model used for decoding the latent."),
            ),
            ("IMAGE",),
            description="Decodes latent images back into pixel space images.",
            output_tooltips=("The decoded image.",),
        ),
        NodeSpec("VAEEncode", "VAE Encode", "latent", (_i("pixels", "IMAGE"), _i("vae", "VAE")), ("LATENT",)),
        NodeSpec(
            "LoadImage",
            "Load Image",
            "image",
            (_combo("image", source="input_images", image_upload=True),),
            ("IMAGE", "MASK"),
            self_validated=("image",),
        ),
        NodeSpec(
            "ImageScale",
            "Upscale Image",
            "image/upscaling",
            (
                _i("image", "IMAGE"),
                _combo("upscale_method", IMAGE_SCALE_METHODS),
                _i("width", "INT", default=512, min=0, max=MAX_RESOLUTION, step=1),
                _i("height", "INT", default=512, min=0, max=MAX_RESOLUTION, step=1),
                _combo("crop", CROP_METHODS),
            ),
            ("IMAGE",),
        ),
        NodeSpec(
            "ImageScaleBy",
            "Upscale Image By",
            "image/upscaling",
            (
                _i("image", "IMAGE"),
                _combo("upscale_method", IMAGE_SCALE_METHODS),
                _i("scale_by", "FLOAT", default=1.0, min=0.01, max=8.0, step=0.01),
            ),
            ("IMAGE",),
        ),
        NodeSpec(
            "LatentUpscale",
            "Upscale Latent",
            "latent",
            (
                _i("samples", "LATENT"),
                _combo("upscale_method", LATENT_SCALE_METHODS),
                _i("width", "INT", default=512, min=0, max=MAX_RESOLUTION, step=8),
                _i("height", "INT", default=512, min=0, max=MAX_RESOLUTION, step=8),
                _combo("crop", CROP_METHODS),
            ),
            ("LATENT",),
        ),
        NodeSpec(
            "LatentUpscaleBy",
            "Upscale Latent By",
            "latent",
            (
                _i("samples", "LATENT"),
                _combo("upscale_method", LATENT_SCALE_METHODS),
                _i("scale_by", "FLOAT", default=1.5, min=0.01, max=8.0, step=0.01),
            ),
            ("LATENT",),
        ),
        NodeSpec(
            "SaveImage",
            "Save Image",
            "image",
            (
                _i("images", "IMAGE", tooltip="The images to save."),
                _i(
                    "filename_prefix",
                    "STRING",
                    default="ComfyUI",
                    tooltip="The prefix for the file to save; may hold a subfolder and %date:yyyy-MM-dd%.",
                ),
            ),
            description="Saves the input images to the tenant's output folder (in S3).",
            output_node=True,
            hidden=_SAVE_HIDDEN,
        ),
        NodeSpec(
            "PreviewImage",
            "Preview Image",
            "image",
            (_i("images", "IMAGE"),),
            description="Saves the input images to the tenant's temp folder (in S3).",
            output_node=True,
            hidden=_SAVE_HIDDEN,
        ),
        NodeSpec(
            "SaveImageAdvanced",
            "Save Image (Advanced)",
            "image",
            (
                _i("images", "IMAGE", tooltip="The images to save."),
                _i(
                    "filename_prefix",
                    "STRING",
                    default="ComfyUI",
                    tooltip="The prefix for the file to save; may hold a subfolder and %date:yyyy-MM-dd%.",
                ),
                # ComfyUI's DynamicCombo ``format``: its option's inputs are widgets named
                # ``format.<input>``; the platform writes 8-bit sRGB PNGs only.
                _combo("format", ("png",), tooltip="The file format in which to save the image."),
                _combo("format.bit_depth", ("8-bit",), advanced=True),
                _combo("format.input_color_space", ("sRGB",), advanced=True),
            ),
            ("IMAGE",),
            output_names=("images",),
            description="Saves the input images to the tenant's output folder (in S3).",
            output_node=True,
            python_module="comfy_extras.nodes_images",
            hidden=_SAVE_HIDDEN,
        ),
        NodeSpec(
            "ResolutionSelector",
            "Resolution Selector",
            "utilities",
            (
                _combo("aspect_ratio", tuple(ASPECT_RATIOS), default="1:1 (Square)"),
                _i("megapixels", "FLOAT", default=1.0, min=0.1, max=16.0, step=0.1),
                _i("multiple", "INT", default=8, min=8, max=128, step=4, advanced=True),
                _i("minimum", "INT", default=256, min=32, max=4096, step=32, advanced=True),
            ),
            ("INT", "INT"),
            output_names=("width", "height"),
            description="Calculate width and height from aspect ratio and megapixel target.",
            python_module="comfy_extras.nodes_resolution",
            evaluate=resolution,
        ),
        NodeSpec(
            "PrimitiveInt",
            "Int",
            "utils/primitive",
            (_i("value", "INT", min=-(2**63) + 1, max=2**63 - 1, control_after_generate=True),),
            ("INT",),
            python_module="comfy_extras.nodes_primitive",
            evaluate=_value,
        ),
        NodeSpec(
            "PrimitiveFloat",
            "Float",
            "utils/primitive",
            (_i("value", "FLOAT", min=-(2**63) + 1, max=2**63 - 1),),
            ("FLOAT",),
            python_module="comfy_extras.nodes_primitive",
            evaluate=_value,
        ),
        NodeSpec(
            "PrimitiveString",
            "String",
            "utils/primitive",
            (_i("value", "STRING"),),
            ("STRING",),
            python_module="comfy_extras.nodes_primitive",
            evaluate=_value,
        ),
        NodeSpec(
            "PrimitiveStringMultiline",
            "String (Multiline)",
            "utils/primitive",
            (_i("value", "STRING", multiline=True),),
            ("STRING",),
            python_module="comfy_extras.nodes_primitive",
            evaluate=_value,
        ),
        NodeSpec(
            "PrimitiveBoolean",
            "Boolean",
            "utils/primitive",
            (_i("value", "BOOLEAN"),),
            ("BOOLEAN",),
            python_module="comfy_extras.nodes_primitive",
            evaluate=_value,
        ),
    )
}

PRIMITIVES = frozenset(n for n in NODES if n.startswith("Primitive"))
#: Nodes whose outputs the platform computes while validating (primitives, ResolutionSelector).
COMPUTED = frozenset(n for n, spec in NODES.items() if spec.evaluate is not None)
SAMPLER_NODES = frozenset({"KSampler", "KSamplerAdvanced"})
OUTPUT_NODES = frozenset(n for n, spec in NODES.items() if spec.output_node)


def input_config(spec: InputSpec, catalog: Catalog) -> list[Any]:
    """The ``[type, options]`` pair ComfyUI echoes in node errors (options ``{}`` when none)."""
    kind: Any = catalog.choices(spec) if spec.is_combo else spec.type
    return [kind, dict(spec.options)]


def published_config(spec: InputSpec, catalog: Catalog) -> list[Any]:
    """An input as ``/object_info`` publishes it: ``[type]``, with ``options`` only when there are some."""
    kind, options = input_config(spec, catalog)
    return [kind, options] if options else [kind]


def node_info(spec: NodeSpec, catalog: Catalog) -> dict[str, Any]:
    """One class as ``GET /object_info`` describes it (the shape of ComfyUI 0.3.64)."""
    sections: dict[str, dict[str, Any]] = {}
    for item in spec.inputs:
        sections.setdefault(item.section, {})[item.name] = published_config(item, catalog)
    if spec.hidden:
        sections["hidden"] = dict(spec.hidden)
    info: dict[str, Any] = {
        "input": sections,
        "input_order": {section: list(inputs) for section, inputs in sections.items()},
        "output": list(spec.outputs),
        "output_is_list": [False] * len(spec.outputs),
        "output_name": list(spec.output_names or spec.outputs),
        "name": spec.name,
        "display_name": spec.display_name,
        "description": spec.description,
        "python_module": spec.python_module,
        "category": spec.category,
        "output_node": spec.output_node,
    }
    if spec.output_tooltips:
        info["output_tooltips"] = list(spec.output_tooltips)
    return info


def object_info(catalog: Catalog, node_class: str | None = None) -> dict[str, Any]:
    """Every supported class (or one; an unknown class answers ``{}`` as ComfyUI does)."""
    if node_class is not None:
        spec = NODES.get(node_class)
        return {node_class: node_info(spec, catalog)} if spec is not None else {}
    return {name: node_info(spec, catalog) for name, spec in NODES.items()}
