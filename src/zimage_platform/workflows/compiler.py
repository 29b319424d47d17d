"""API-format graph → platform jobs.

Every output node (SaveImage, PreviewImage) is traced back to the sampler that produced its
pixels; each distinct final sampler becomes one platform job:

- ``EmptyLatentImage``/``EmptySD3LatentImage`` → text-to-image (``batch_size`` → ``n``);
- ``VAEEncode`` of a ``LoadImage`` (optionally scaled) with ``denoise < 1`` (or
  ``start_at_step > 0``) → image-to-image;
- a first sampler whose output is upscaled (``LatentUpscale``/``LatentUpscaleBy``, or decoded,
  ``ImageScale``d with lanczos and re-encoded) and refined by a second sampler → hires-fix.

ComfyUI's partial denoise runs the *last* ``steps`` steps of an ``int(steps / denoise)``-step
schedule; the platform's img2img runs the last ``int(total * strength)`` steps of a ``total``-step
schedule. The compiler translates one into the other exactly (same schedule length, same number
of steps run), and refuses — as a node error naming the valid values — whatever the engines
cannot honour, instead of substituting something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zimage_platform.pipeline.buckets import Resolution
from zimage_platform.pipeline.params import GenerationParams
from zimage_platform.workflows.nodes import NODES, SAMPLER_NODES, SAMPLERS, Catalog
from zimage_platform.workflows.validation import (
    PromptRejected,
    ValidatedGraph,
    comfy_error,
    custom_error,
    validate_prompt,
)

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

LATENTS = frozenset({"EmptyLatentImage", "EmptySD3LatentImage"})
IMAGE_SCALES = frozenset({"ImageScale", "ImageScaleBy"})
LATENT_SCALES = frozenset({"LatentUpscale", "LatentUpscaleBy"})
#: Output nodes that write to the tenant's output folder under a ``filename_prefix``.
SAVE_NODES = frozenset({"SaveImage", "SaveImageAdvanced"})


class NodeFailure(Exception):
    """A node asks for something the platform cannot run (reported as that node's error)."""

    def __init__(self, node: str, error: dict[str, Any]) -> None:
        super().__init__(error["details"])
        self.node = node
        self.error = error


def _fail(node: str, input_name: str, reason: str, *, code: str, choices: list | None = None) -> NodeFailure:
    return NodeFailure(node, custom_error(input_name, reason, code=code, choices=choices))


def strength_for(total: int, run: int) -> float:
    """The img2img strength that makes the engines run exactly the last ``run`` of ``total`` steps
    (the pipeline runs ``total - int(total - total * strength)``; floats need a nudge of an ulp)."""
    base = run / total
    candidates = [base]
    up = down = base
    for _ in range(4):
        up, down = math.nextafter(up, 2.0), math.nextafter(down, 0.0)
        candidates += [down, up]
    for s in candidates:
        if 0 < s <= 1 and total - int(max(total - min(total * s, total), 0)) == run and int(total * s) >= 1:
            return s
    raise ValueError(f"no strength runs {run} of {total} steps")


@dataclass(frozen=True)
class ImageOp:
    """A ComfyUI image scale applied to an uploaded image before it becomes the init image."""

    node: str
    method: str
    width: int
    height: int
    crop: str = "disabled"


@dataclass
class ImageInput:
    name: str
    node: str
    ops: list[ImageOp]
    size: tuple[int, int]


@dataclass
class PlannedJob:
    """One platform job: what to generate, and which ComfyUI nodes it stands for."""

    sampler: str
    variant: str
    params: GenerationParams
    image: ImageInput | None = None
    #: Platform parameter → the (node, input) it came from (platform errors become node errors).
    provenance: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Pipeline pass name ("generate", or "base" and "hires") → the sampler node running it.
    passes: dict[str, str] = field(default_factory=dict)
    pre: list[str] = field(default_factory=list)
    between: list[str] = field(default_factory=list)
    post: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def node_of(self, param: str | None) -> tuple[str, str]:
        return self.provenance.get(param or "", (self.sampler, param or "latent_image"))


@dataclass
class CompiledPrompt:
    graph: ValidatedGraph
    jobs: list[PlannedJob]
    #: Every node an accepted output needs, in the order ComfyUI would execute them.
    order: list[str]

    @property
    def outputs(self) -> list[str]:
        return self.graph.good_outputs

    @property
    def node_errors(self) -> dict[str, Any]:
        return self.graph.node_errors


@dataclass
class _Model:
    variant: str
    checkpoint: str
    shift: float | None
    variant_from: tuple[str, str]
    shift_from: tuple[str, str] | None


@dataclass
class _Sampler:
    node: str
    cls: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    total: int
    run: int
    model: _Model
    positive: tuple[str, str]
    negative: tuple[str | None, str]
    latent: str
    #: The input that sets how much of the schedule runs (denoise or start_at_step).
    partial_input: str

    @property
    def seed_input(self) -> str:
        return "noise_seed" if self.cls == "KSamplerAdvanced" else "seed"

    @property
    def full(self) -> bool:
        return self.run == self.total


class _Compiler:
    def __init__(self, graph: ValidatedGraph, catalog: Catalog, config: PlatformConfig) -> None:
        self.g = graph
        self.catalog = catalog
        self.config = config

    # -- reading the graph ----------------------------------------------------------------

    def cls(self, node: str) -> str:
        return self.g.class_of(node)

    def val(self, node: str, name: str) -> Any:
        return self.g.values[node].get(name)

    def src(self, node: str, name: str) -> str:
        source = self.g.source(node, name)
        assert source is not None, f"{node}.{name} is not linked"  # validation guarantees it
        return source[0]

    # -- pieces ---------------------------------------------------------------------------

    def model(self, node: str) -> _Model:
        cls = self.cls(node)
        if cls == "ModelSamplingAuraFlow":
            inner = self.model(self.src(node, "model"))
            inner.shift, inner.shift_from = float(self.val(node, "shift")), (node, "shift")
            return inner
        field_name = "ckpt_name" if cls == "CheckpointLoaderSimple" else "unet_name"
        variant, checkpoint = self.catalog.models[self.val(node, field_name)]
        return _Model(variant, checkpoint, None, (node, field_name), None)

    def component(self, node: str, kind: str, model: _Model) -> None:
        """A text encoder or VAE must be one of the model's variant or its checkpoint's."""
        cls = self.cls(node)
        if cls == "CheckpointLoaderSimple":
            name_field, folder = "ckpt_name", "checkpoints"
        else:
            name_field, folder = ("clip_name", "text_encoders") if kind == "CLIP" else ("vae_name", "vae")

        def fits(name: str) -> bool:
            owners = self.catalog.files.get((folder, name), [])
            return any(v == model.variant or c == model.checkpoint for v, c in owners)

        if not fits(self.val(node, name_field)):
            fits_list = [n for n in self.catalog.lists[folder] if fits(n)]
            raise _fail(
                node,
                name_field,
                f"{self.val(node, name_field)} belongs to another checkpoint than the model "
                f"z_image_{model.variant}; a variant runs with its own text encoder and VAE",
                code="component_mismatch",
                choices=fits_list,
            )

    def conditioning(self, node: str, model: _Model) -> tuple[str | None, str]:
        """``(text, node)``; ``text`` is None for a zeroed-out conditioning."""
        if self.cls(node) == "ConditioningZeroOut":
            return None, node
        self.component(self.src(node, "clip"), "CLIP", model)
        return str(self.val(node, "text")), node

    def sampler(self, node: str) -> _Sampler:
        cls = self.cls(node)
        steps = int(self.val(node, "steps"))
        if cls == "KSampler":
            denoise = float(self.val(node, "denoise"))
            if denoise <= 0:
                raise _fail(node, "denoise", "denoise 0 runs no step", code="denoise_out_of_range")
            total, run, partial = (
                (steps, steps, "denoise") if denoise > 0.9999 else (int(steps / denoise), steps, "denoise")
            )
            seed = int(self.val(node, "seed"))
        else:
            start, end = int(self.val(node, "start_at_step")), int(self.val(node, "end_at_step"))
            if end < steps:
                raise _fail(
                    node,
                    "end_at_step",
                    f"stopping at step {end} of {steps} leaves noise in the latent, which the platform does not "
                    f"return; end_at_step must be at least steps ({steps})",
                    code="leftover_noise_unsupported",
                )
            if start >= steps:
                raise _fail(node, "start_at_step", f"must be below steps ({steps})", code="start_at_step_out_of_range")
            total, run, partial = steps, steps - start, "start_at_step"
            seed = int(self.val(node, "noise_seed"))
        model = self.model(self.src(node, "model"))
        positive, pos_node = self.conditioning(self.src(node, "positive"), model)
        if positive is None:
            raise _fail(
                node,
                "positive",
                "the positive conditioning must be a CLIPTextEncode (a zeroed-out one has no prompt)",
                code="positive_not_text",
            )
        negative, neg_node = self.conditioning(self.src(node, "negative"), model)
        cfg = float(self.val(node, "cfg"))
        if negative is None and cfg > 1.0:
            raise _fail(
                node,
                "negative",
                "a ConditioningZeroOut negative is only supported with cfg 1 (no guidance); with guidance, "
                "use a CLIPTextEncode negative (an empty text for no negative prompt)",
                code="zero_negative_with_cfg",
            )
        return _Sampler(
            node=node,
            cls=cls,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler=self.val(node, "sampler_name"),
            scheduler=self.val(node, "scheduler"),
            total=total,
            run=run,
            model=model,
            positive=(positive, pos_node),
            negative=(negative, neg_node),
            latent=self.src(node, "latent_image"),
            partial_input=partial,
        )

    def image_chain(self, node: str) -> tuple[str, list[str]]:
        """Walk image scales back to their origin: ``(origin node, [scale nodes, first to last])``."""
        scales: list[str] = []
        while self.cls(node) in IMAGE_SCALES:
            scales.insert(0, node)
            node = self.src(node, "image")
        return node, scales

    def scaled(self, size: tuple[int, int], scale_node: str) -> tuple[tuple[int, int], ImageOp]:
        """The image size after ``scale_node``, refused (on that node) when it is larger than the
        platform's image limit: every intermediate size is checked, not only the last."""
        w, h = size
        method = self.val(scale_node, "upscale_method")
        if self.cls(scale_node) == "ImageScaleBy":
            factor = float(self.val(scale_node, "scale_by"))
            target = (max(1, round(w * factor)), max(1, round(h * factor)))
            self.check_image_size(target, scale_node, "scale_by")
            return target, ImageOp(scale_node, method, *target)
        tw, th = int(self.val(scale_node, "width")), int(self.val(scale_node, "height"))
        if tw == 0 and th == 0:
            tw, th = w, h
        elif tw == 0:
            tw = max(1, round(w * th / h))
        elif th == 0:
            th = max(1, round(h * tw / w))
        self.check_image_size((tw, th), scale_node, "width")
        return (tw, th), ImageOp(scale_node, method, tw, th, self.val(scale_node, "crop"))

    def check_image_size(self, size: tuple[int, int], node: str, input_name: str) -> None:
        limit = self.config.limits.max_input_image_pixels
        if size[0] * size[1] > limit:
            raise _fail(
                node,
                input_name,
                f"this makes a {size[0]}x{size[1]} image ({size[0] * size[1]} pixels); images in a workflow may "
                f"have at most {limit} pixels",
                code="image_too_many_pixels",
            )

    def latent_scaled(self, size: tuple[int, int], node: str) -> tuple[int, int]:
        """ComfyUI scales latents in 8-pixel cells (``LatentUpscale`` floors, ``...By`` rounds)."""
        w, h = size
        if self.cls(node) == "LatentUpscaleBy":
            factor = float(self.val(node, "scale_by"))
            return round(w // 8 * factor) * 8, round(h // 8 * factor) * 8
        tw, th = int(self.val(node, "width")), int(self.val(node, "height"))
        if tw == 0 and th == 0:
            return w, h
        if tw == 0:
            th = max(64, th)
            tw = max(64, round(w * th / h))
        elif th == 0:
            tw = max(64, tw)
            th = max(64, round(h * tw / w))
        if self.val(node, "crop") == "center" and abs(tw / th - w / h) > 1e-6:
            raise _fail(
                node,
                "crop",
                "the hires-fix refinement stretches the first pass to the target size; cropping to another "
                "aspect ratio is not supported",
                code="crop_unsupported",
                choices=["disabled"],
            )
        return tw // 8 * 8, th // 8 * 8

    def bucket(self, variant: str, size: tuple[int, int], node: str, input_name: str) -> str:
        """``WIDTHxHEIGHT`` when the variant runs that size (a bucket, or any size its rule
        allows); a node error with the rule and the buckets otherwise."""
        sizes = self.config.buckets_for(variant)
        res = Resolution(*size)
        if not sizes.allows(res):
            rule = sizes.rule.describe() if sizes.rule else "one of the buckets"
            raise _fail(
                node,
                input_name,
                f"{res} is not a size z_image_{variant} runs ({rule}); the platform never resizes silently",
                code="unsupported_size",
                choices=sizes.names,
            )
        return str(res)

    # -- one output -----------------------------------------------------------------------

    def job_for_output(self, output: str) -> PlannedJob:
        origin, scales = self.image_chain(self.src(output, "images"))
        if scales:
            raise _fail(
                scales[0],
                "image",
                "scaling a generated image is not supported: the platform returns images at the sampler's "
                "resolution bucket (generate at the size you need, or use a hires-fix)",
                code="post_scale_unsupported",
            )
        if self.cls(origin) != "VAEDecode" or self.cls(self.src(origin, "samples")) not in SAMPLER_NODES:
            raise _fail(
                output,
                "images",
                "the images must come from a VAEDecode of a KSampler: the platform runs generation graphs",
                code="no_generation",
            )
        if self.cls(output) in SAVE_NODES:
            prefix = str(self.val(output, "filename_prefix"))
            parts = prefix.replace("\\", "/").split("/")
            if not prefix.strip() or prefix.startswith("/") or ".." in parts or len(prefix) > 200:
                raise _fail(
                    output,
                    "filename_prefix",
                    "must be a relative name inside the output folder (no '..', no leading '/', "
                    "200 characters at most)",
                    code="invalid_filename_prefix",
                )
        final = self.sampler(self.src(origin, "samples"))
        self.component(self.src(origin, "vae"), "VAE", final.model)
        job = self.plan(final)
        job.post = [origin]
        return job

    def plan(self, s: _Sampler) -> PlannedJob:
        latent_cls = self.cls(s.latent)
        if latent_cls in LATENTS:
            if not s.full:
                raise _fail(
                    s.node,
                    s.partial_input,
                    "a partial denoise needs an input latent (VAEEncode of an image, or an upscaled sampler "
                    "output); an empty latent is denoised fully",
                    code="partial_denoise_of_empty_latent",
                    choices=[1.0] if s.cls == "KSampler" else [0],
                )
            return self.text2img(s, s.latent)
        if latent_cls == "VAEEncode":
            self.component(self.src(s.latent, "vae"), "VAE", s.model)
            origin, scales = self.image_chain(self.src(s.latent, "pixels"))
            if self.cls(origin) == "LoadImage":
                return self.img2img(s, origin, scales)
            if self.cls(origin) == "VAEDecode" and self.cls(self.src(origin, "samples")) in SAMPLER_NODES:
                return self.hires(s, self.src(origin, "samples"), [origin, *scales, s.latent], pixel=scales)
            raise _fail(
                s.latent,
                "pixels",
                "the pixels must come from LoadImage (image to image) or from a VAEDecode of a first sampler "
                "(hires-fix)",
                code="unsupported_image_source",
            )
        if latent_cls in LATENT_SCALES:
            chain, node = [], s.latent
            while self.cls(node) in LATENT_SCALES:
                chain.insert(0, node)
                node = self.src(node, "samples")
            if self.cls(node) in SAMPLER_NODES:
                return self.hires(s, node, chain, latent=chain)
            raise _fail(
                chain[0],
                "samples",
                "an upscaled latent must come from a first sampler (hires-fix)",
                code="unsupported_latent_source",
            )
        raise _fail(
            s.node,
            "latent_image",
            "sampling another sampler's output without an upscale is not supported; the platform's second "
            "pass is a hires-fix refinement of an upscaled first pass",
            code="unsupported_latent_source",
        )

    def _base(self, s: _Sampler, params: GenerationParams, pass_name: str) -> PlannedJob:
        m = s.model
        provenance = {
            "variant": m.variant_from,
            "seed": (s.node, s.seed_input),
            "steps": (s.node, "steps"),
            "guidance": (s.node, "cfg"),
            "sampler": (s.node, "sampler_name"),
            "scheduler": (s.node, "scheduler"),
            "prompt": (s.positive[1], "text"),
            "negative_prompt": (s.negative[1], "text" if s.negative[0] is not None else "conditioning"),
            "strength": (s.node, s.partial_input),
        }
        if m.shift_from is not None:
            provenance["shift"] = m.shift_from
        limits = self.config.variant(m.variant).limits
        if not limits.min_steps <= s.total <= limits.max_steps:
            how = f"steps {s.steps}" if s.full else f"{s.run} of a {s.total}-step schedule (steps / denoise)"
            raise _fail(
                s.node,
                "steps",
                f"z_image_{m.variant} runs {limits.min_steps} to {limits.max_steps} steps; this asks for {how}",
                code="steps_out_of_range",
            )
        if s.cfg - 1.0 > limits.max_guidance:
            raise _fail(
                s.node,
                "cfg",
                f"cfg must be between 1 and {limits.max_guidance + 1:g} for z_image_{m.variant} (1 = no guidance)",
                code="guidance_out_of_range",
            )
        params.seed, params.guidance = s.seed, round(s.cfg - 1.0, 6)
        params.sampler, params.shift = SAMPLERS[s.sampler], m.shift
        params.scheduler = s.scheduler
        params.prompt = s.positive[0] or ""
        params.negative_prompt = s.negative[0] if s.negative[0] is not None else ""
        return PlannedJob(s.node, m.variant, params, provenance=provenance, passes={pass_name: s.node})

    def text2img(self, s: _Sampler, latent: str) -> PlannedJob:
        size = self.bucket(
            s.model.variant, (int(self.val(latent, "width")), int(self.val(latent, "height"))), latent, "width"
        )
        params = GenerationParams(prompt="", size=size, n=int(self.val(latent, "batch_size")), steps=s.total)
        job = self._base(s, params, "generate")
        job.provenance.update(size=(latent, "width"), n=(latent, "batch_size"))
        return job

    def img2img(self, s: _Sampler, load: str, scales: list[str]) -> PlannedJob:
        name = self.val(load, "image")
        size = self.catalog.images[name]
        ops = []
        for node in scales:
            size, op = self.scaled(size, node)
            ops.append(op)
        where = (scales[-1], "width") if scales else (load, "image")
        text = self.bucket(s.model.variant, size, *where)
        if s.full:  # a full denoise replaces the encoded image: text to image at its size
            params = GenerationParams(prompt="", size=text, n=1, steps=s.total)
            job = self._base(s, params, "generate")
            job.provenance.update(size=where)
            return job
        params = GenerationParams(prompt="", size=text, n=1, steps=s.total, strength=strength_for(s.total, s.run))
        job = self._base(s, params, "generate")
        job.image = ImageInput(name, load, ops, size)
        job.provenance.update(size=where, image=(load, "image"))
        return job

    def hires(
        self, s: _Sampler, first_node: str, between: list[str], *, latent: list[str] = (), pixel: list[str] = ()
    ) -> PlannedJob:
        first = self.sampler(first_node)
        if self.cls(first.latent) not in LATENTS or not first.full:
            raise _fail(
                first.node,
                "latent_image",
                "the first pass of a hires-fix must denoise an empty latent fully",
                code="hires_first_pass_unsupported",
            )
        if s.full:
            raise _fail(
                s.node,
                s.partial_input,
                "the refinement pass of a hires-fix must denoise partially (denoise < 1)",
                code="hires_denoise_out_of_range",
            )
        same = (
            ("model", (s.model.variant, s.model.shift), (first.model.variant, first.model.shift)),
            ("positive", s.positive[0], first.positive[0]),
            ("negative", s.negative[0], first.negative[0]),
            ("cfg", s.cfg, first.cfg),
            ("sampler_name", s.sampler, first.sampler),
            ("scheduler", s.scheduler, first.scheduler),
            (s.seed_input, s.seed, first.seed),
        )
        for input_name, mine, theirs in same:
            if mine != theirs:
                raise _fail(
                    s.node,
                    input_name,
                    f"must match the first pass (KSampler {first.node}): the platform's hires-fix refines with "
                    "the first pass's model, prompts, cfg, sampler and seed",
                    code="hires_mismatch",
                )
        if s.total != first.steps:
            fit = max(1, round(first.steps * s.run / s.total))
            raise _fail(
                s.node,
                "steps",
                f"runs the last {s.run} of a {s.total}-step schedule; a hires-fix refines on the first pass's "
                f"{first.steps}-step schedule (e.g. steps {fit} with denoise {fit / first.steps:.2f})",
                code="hires_steps_mismatch",
            )
        base_latent = first.latent
        base = (int(self.val(base_latent, "width")), int(self.val(base_latent, "height")))
        target = base
        if latent:
            for node in latent:
                target = self.latent_scaled(target, node)
            where = (latent[-1], "width")
        else:
            for node in pixel:
                if self.val(node, "upscale_method") != "lanczos":
                    raise _fail(
                        node,
                        "upscale_method",
                        "the hires-fix upscales the first pass with lanczos",
                        code="upscale_method_unsupported",
                        choices=["lanczos"],
                    )
                target, op = self.scaled(target, node)
                if op.crop == "center" and abs(op.width / op.height - base[0] / base[1]) > 1e-6:
                    raise _fail(
                        node,
                        "crop",
                        "cropping to another aspect ratio is not supported",
                        code="crop_unsupported",
                        choices=["disabled"],
                    )
            where = (pixel[-1], "width") if pixel else (s.latent, "pixels")
        variant = s.model.variant
        base_text = self.bucket(variant, base, base_latent, "width")
        target_text = self.bucket(variant, target, *where)
        if base[0] * base[1] >= target[0] * target[1]:
            raise _fail(
                *where,
                f"the hires-fix target {target_text} must be larger than the first pass {base_text}",
                code="hires_not_smaller",
            )
        params = GenerationParams(
            prompt="",
            size=target_text,
            n=int(self.val(base_latent, "batch_size")),
            steps=first.steps,
            hires_from=base_text,
            hires_denoise=strength_for(s.total, s.run),
        )
        job = self._base(first, params, "base")
        job.sampler = s.node
        job.passes["hires"] = s.node
        job.between = list(between)
        job.provenance.update(
            size=where,
            n=(base_latent, "batch_size"),
            hires_from=(base_latent, "width"),
            hires_denoise=(s.node, s.partial_input),
        )
        return job


def execution_order(graph: ValidatedGraph, outputs: list[str]) -> list[str]:
    """Nodes the outputs need, each after its inputs (depth first, inputs in declared order)."""
    order: list[str] = []

    def visit(node: str) -> None:
        if node in order:
            return
        for item in NODES[graph.class_of(node)].inputs:
            source = graph.source(node, item.name)
            if source is not None:
                visit(source[0])
        order.append(node)

    for output in outputs:
        visit(output)
    return order


def _upstream(graph: ValidatedGraph, node: str, seen: set[str]) -> set[str]:
    if node not in seen:
        seen.add(node)
        for source, _ in graph.links.get(node, {}).values():
            _upstream(graph, source, seen)
    return seen


def compile_prompt(prompt: Any, catalog: Catalog, config: PlatformConfig) -> CompiledPrompt:
    """Validate and compile; outputs that cannot run become node errors, and the prompt is
    refused (:class:`PromptRejected`) when none can."""
    graph = validate_prompt(prompt, catalog)
    compiler = _Compiler(graph, catalog, config)
    jobs: dict[str, PlannedJob] = {}
    for output in list(graph.good_outputs):
        try:
            job = compiler.job_for_output(output)
        except NodeFailure as exc:
            graph.good_outputs.remove(output)
            graph.add_node_error(exc.node, exc.error, output)
            continue
        planned = jobs.setdefault(job.sampler, job)
        planned.outputs.append(output)
        planned.post += [n for n in job.post if n not in planned.post]
    if not graph.good_outputs:
        # As ComfyUI: the summary lists the failing output nodes' own errors.
        own = [e for node in graph.outputs for e in graph.node_errors.get(node, {}).get("errors", [])]
        details = "\n".join(f"{e['message']}: {e['details']}" for e in own)
        raise PromptRejected(
            comfy_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
            graph.node_errors,
        )
    order = execution_order(graph, graph.good_outputs)
    for job in jobs.values():
        needed: set[str] = set()
        for output in job.outputs:
            _upstream(graph, output, needed)
        special = {*job.passes.values(), *job.between, *job.post, *job.outputs}
        job.pre = [n for n in order if n in needed and n not in special]
        job.between = [n for n in order if n in job.between]
        job.post = [n for n in order if n in job.post]
    return CompiledPrompt(graph=graph, jobs=list(jobs.values()), order=order)
