"""From what a caller asked for to concrete pipeline requests: defaults, limits, refusals.

Every entry point (CLI, HTTP, ComfyUI compiler, bulk batches) goes through
:func:`resolve_requests`, so a bad size or sampler is refused the same way everywhere, with a
machine-readable code and the valid choices.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.buckets import BucketSet
from zimage_platform.pipeline.samplers import check_sampler
from zimage_platform.pipeline.schedules import check_schedule
from zimage_platform.pipeline.types import GenerationRequest, HiresFix

if TYPE_CHECKING:
    from zimage_platform.config import VariantSpec

#: Seeds span ComfyUI's range, 0 … 2**64 − 1; torch's generator takes them as they are
#: (``manual_seed`` accepts unsigned 64-bit), so a seed means the same noise at any size.
MAX_SEED = 2**64 - 1
#: A seed drawn for a request that names none stays below 2**53, so JSON clients that read
#: numbers as doubles (JavaScript) can send it back exactly.
RANDOM_SEED_BOUND = 2**53
MAX_IMAGES_PER_REQUEST = 16


@dataclass
class GenerationParams:
    """Caller-facing parameters; ``None`` means "the variant's default"."""

    prompt: str
    size: str | None = None
    n: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    sampler: str | None = None
    scheduler: str | None = None
    shift: float | None = None
    image: Image.Image | None = None
    strength: float | None = None
    hires_from: str | None = None
    hires_denoise: float | None = None
    #: PNG text chunks for the images (ComfyUI prompts: ``prompt`` and ``workflow``).
    png_text: dict[str, str] | None = None


def resolve_requests(
    params: GenerationParams, spec: VariantSpec, buckets: BucketSet, *, max_prompt_chars: int = 8000
) -> list[GenerationRequest]:
    """Validate ``params`` against the variant and expand ``n`` into one request per image."""
    d, lim = spec.defaults, spec.limits
    if not params.prompt or not params.prompt.strip():
        raise InvalidRequest("prompt must not be empty", code="prompt_empty", param="prompt")
    for name, text in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt or "")):
        if len(text) > max_prompt_chars:
            raise InvalidRequest(
                f"{name} has {len(text)} characters; the limit is {max_prompt_chars}",
                code="prompt_too_long",
                param=name,
            )
    if not 1 <= params.n <= MAX_IMAGES_PER_REQUEST:
        raise InvalidRequest(f"n must be between 1 and {MAX_IMAGES_PER_REQUEST}", code="n_out_of_range", param="n")
    size = buckets.resolve(params.size or d.size)
    steps = d.steps if params.steps is None else params.steps
    if not lim.min_steps <= steps <= lim.max_steps:
        raise InvalidRequest(
            f"steps must be between {lim.min_steps} and {lim.max_steps} for {spec.name}",
            code="steps_out_of_range",
            param="steps",
        )
    guidance = d.guidance if params.guidance is None else params.guidance
    if not 0 <= guidance <= lim.max_guidance:
        raise InvalidRequest(
            f"guidance must be between 0 and {lim.max_guidance}", code="guidance_out_of_range", param="guidance"
        )
    sampler = check_sampler(params.sampler or d.sampler)
    scheduler = check_schedule(params.scheduler or d.scheduler)
    shift = d.shift if params.shift is None else params.shift
    if not 0 < shift <= 20:
        raise InvalidRequest("shift must be in (0, 20]", code="shift_out_of_range", param="shift")
    seed = secrets.randbelow(RANDOM_SEED_BOUND) if params.seed is None else params.seed
    if not 0 <= seed <= MAX_SEED - (params.n - 1):
        raise InvalidRequest(
            f"seed must be between 0 and {MAX_SEED - (params.n - 1)} (images get seed, seed+1, ...)",
            code="seed_out_of_range",
            param="seed",
        )

    image, strength = params.image, 1.0
    if spec.mode == "img2img" and image is None:
        raise InvalidRequest(
            f"variant {spec.name} edits an input image; none was given", code="image_required", param="image"
        )
    if image is not None:
        strength = d.strength if params.strength is None else params.strength
        if not 0 < strength <= 1:
            raise InvalidRequest("strength must be in (0, 1]", code="strength_out_of_range", param="strength")
        if int(steps * strength) < 1:
            raise InvalidRequest(
                f"strength {strength} leaves no denoising step out of {steps}",
                code="strength_too_low",
                param="strength",
            )
        image = image.convert("RGB")

    hires = None
    if params.hires_from is not None:
        if image is not None:
            raise InvalidRequest("hires-fix draws its own first pass; it takes no input image", code="hires_with_image")
        base = buckets.resolve(params.hires_from, param="hires_from")
        if base.pixels >= size.pixels:
            raise InvalidRequest(
                f"hires_from {base} must be smaller than the target size {size}",
                code="hires_not_smaller",
                param="hires_from",
                choices=[str(b) for b in buckets if b.pixels < size.pixels],
            )
        denoise = 0.5 if params.hires_denoise is None else params.hires_denoise
        if not 0 < denoise <= 1 or int(steps * denoise) < 1:
            raise InvalidRequest(
                "hires_denoise must be in (0, 1] and leave a step",
                code="hires_denoise_out_of_range",
                param="hires_denoise",
            )
        hires = HiresFix(base_size=base, denoise=denoise)

    return [
        GenerationRequest(
            prompt=params.prompt,
            size=size,
            seed=seed + i,
            steps=steps,
            guidance=guidance,
            negative_prompt=d.negative_prompt if params.negative_prompt is None else params.negative_prompt,
            sampler=sampler,
            scheduler=scheduler,
            shift=shift,
            init_image=image,
            strength=strength,
            hires=hires,
            png_text=params.png_text,
        )
        for i in range(params.n)
    ]
