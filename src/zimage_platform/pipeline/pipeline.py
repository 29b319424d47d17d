"""The Z-Image pipeline for batches of independent requests. Read it top to bottom.

It runs diffusers' own components (``ZImagePipeline``'s text encoder, tokenizer, VAE, image
processor and latent preparation; the flow-matching schedulers) and keeps the denoising loop
here because a platform batch is not a diffusers batch: each member has its own prompt,
negative prompt, seed and guidance scale, may be cancelled on its own at a step boundary, and
must come out exactly as it would alone. The transformer and the VAE decoder are behind two
small protocols so a compiled engine (ONNX Runtime, TensorRT) can stand in for torch.

For a single Euler request the result is the same image ``ZImagePipeline.__call__`` draws
(tested), so the stock pipeline remains the reference.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import torch
from diffusers.pipelines.z_image.pipeline_z_image_img2img import retrieve_latents
from PIL import Image

from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.images import encode_png
from zimage_platform.pipeline.prompt_cache import PromptEmbeddingCache
from zimage_platform.pipeline.samplers import keep_rows, make_scheduler, noise_to, set_schedule
from zimage_platform.pipeline.types import (
    BatchKey,
    CancelFn,
    GenerationRequest,
    GenerationResult,
    PassTimings,
    ProgressFn,
    StepEvent,
)


class Denoiser(Protocol):
    """One transformer forward: latents ``[B,16,h,w]``, model timesteps ``[B]`` in [0, 1],
    one caption embedding ``[L_i, D]`` per row → velocity ``[B,16,h,w]`` (float32)."""

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor: ...


class LatentDecoder(Protocol):
    """VAE decode of unscaled latents ``[B,16,h,w]`` → 8-bit images ``[B,H,W,3]``
    (:func:`to_uint8` of the VAE output: the conversion is part of the compiled graph)."""

    def __call__(self, latents: torch.Tensor) -> torch.Tensor: ...


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1], ``[B,3,H,W]`` → ``[B,H,W,3]`` uint8, exactly as diffusers'
    ``VaeImageProcessor.postprocess(..., "pil")`` computes it (so images match the stock pipeline)."""
    unit = (pixels.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (unit * 255).round().to(torch.uint8)


def _never_cancelled(_: str) -> bool:
    return False


class ZImageBatchPipeline:
    def __init__(
        self,
        pipe,  # diffusers.ZImagePipeline: the loaded components
        denoiser: Denoiser,
        decoder: LatentDecoder,
        prompt_cache: PromptEmbeddingCache,
        *,
        max_sequence_length: int = 512,
        device: torch.device | str = "cpu",
        png_compress_level: int = 1,
    ) -> None:
        self.pipe = pipe
        self.denoiser = denoiser
        self.decoder = decoder
        self.prompt_cache = prompt_cache
        self.max_sequence_length = max_sequence_length
        self.device = torch.device(device)
        self.png_compress_level = png_compress_level
        self.latent_channels = pipe.transformer.config.in_channels

    # -- entry points -------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: ProgressFn | None = None,
        is_cancelled: CancelFn | None = None,
    ) -> list[GenerationResult]:
        """Any mix of requests: compatible ones share a batch; hires-fix runs its two passes."""
        groups: dict[tuple, list[GenerationRequest]] = defaultdict(list)
        for request in requests:
            groups[(request.batch_key(), request.hires)].append(request)
        results: dict[str, GenerationResult] = {}
        for (_, hires), members in groups.items():
            run = self._run_hires if hires is not None else self.run_batch
            for result in run(members, on_progress, is_cancelled):
                results[result.request_id] = result
        return [results[r.request_id] for r in requests]

    def run_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: ProgressFn | None = None,
        is_cancelled: CancelFn | None = None,
        *,
        pass_name: str = "generate",
    ) -> list[GenerationResult]:
        """One denoising loop over compatible requests; results in request order."""
        key = self._check_batch(requests)
        is_cancelled = is_cancelled or _never_cancelled
        timings = PassTimings(name=pass_name, size=key.size, batch_size=len(requests))

        # 1. Text: each member's prompt (and negative prompt, with CFG), via the cache.
        with timings.stage("text_encode"):
            captions = self.encode_prompts([r.prompt for r in requests])
            negatives = self.encode_prompts([r.negative_prompt for r in requests]) if key.cfg else []

        # 2. The schedule, shared by the batch (that is what the batch key guarantees).
        scheduler = make_scheduler(key.sampler, key.shift, self.pipe.scheduler.config)
        h, w = key.size.latent_shape
        timesteps = set_schedule(scheduler, key.steps, (h // 2) * (w // 2), self.device, key.scheduler)
        if key.strength is not None:
            timesteps = self._start_at_strength(scheduler, timesteps, key.strength)
        else:
            scheduler.set_begin_index(0)

        # 3. Starting latents, each from its own seed: a member's noise never depends on its batch.
        with timings.stage("image_encode" if key.strength is not None else None):
            latents = torch.cat([self._initial_latents(r, scheduler, timesteps[:1]) for r in requests])

        # 4. Denoise, dropping members cancelled at each step boundary.
        denoise_started = time.time_ns()
        alive = list(range(len(requests)))
        guidance = torch.tensor([r.guidance for r in requests], dtype=torch.float32).view(-1, 1, 1, 1)
        for i, t in enumerate(timesteps):
            keep = [pos for pos, j in enumerate(alive) if not is_cancelled(requests[j].request_id)]
            if len(keep) < len(alive):
                alive = [alive[pos] for pos in keep]
                if not alive:
                    break
                latents = latents[keep]
                keep_rows(scheduler, keep)
            step_start = time.perf_counter()
            latents = self._denoise_step(
                latents,
                t,
                scheduler,
                [captions[j] for j in alive],
                [negatives[j] for j in alive] if key.cfg else None,
                guidance[alive],
            )
            timings.denoise_step_s.append(time.perf_counter() - step_start)
            if on_progress is not None:
                on_progress(StepEvent(tuple(requests[j].request_id for j in alive), i + 1, len(timesteps), pass_name))
        timings.mark("denoise", denoise_started, steps=len(timings.denoise_step_s))

        # 5. Decode the survivors to pixels, then 6. encode each as PNG.
        images: dict[int, Image.Image] = {}
        pngs: dict[int, bytes] = {}
        if alive:
            with timings.stage("decode"):
                decoded = self.decode(latents)
            with timings.stage("png_encode"):
                for j, image in zip(alive, decoded, strict=True):
                    images[j] = image
                    pngs[j] = encode_png(image, self.png_compress_level, text=requests[j].png_text)
        return [
            GenerationResult(
                request_id=r.request_id,
                seed=r.seed,
                size=r.size,
                image=images.get(j),
                png=pngs.get(j),
                passes=[timings],
                cancelled=j not in images,
            )
            for j, r in enumerate(requests)
        ]

    # -- stages -------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Caption embeddings ``[L_i, D]`` (Qwen3's second-to-last layer, padding removed)."""

        def encode(batch: list[str]) -> list[torch.Tensor]:
            # ZImagePipeline rewrites the list it is given in place: hand it a copy.
            embeds, _ = self.pipe.encode_prompt(
                prompt=list(batch),
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            return embeds

        with torch.inference_mode():
            return self.prompt_cache.encode(prompts, self.max_sequence_length, encode)

    def _initial_latents(self, request: GenerationRequest, scheduler, first_timestep: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        h, w = request.size.height, request.size.width
        with torch.inference_mode():
            if request.init_image is None:
                return self.pipe.prepare_latents(1, self.latent_channels, h, w, torch.float32, self.device, generator)
            # img2img, as ZImageImg2ImgPipeline: encode (sampling with the seed), then re-noise.
            pixels = self.pipe.image_processor.preprocess(request.init_image, height=h, width=w)
            vae = self.pipe.vae
            encoded = retrieve_latents(vae.encode(pixels.to(self.device, vae.dtype)), generator=generator)
            clean = (encoded - vae.config.shift_factor) * vae.config.scaling_factor
            noise = self.pipe.prepare_latents(1, self.latent_channels, h, w, torch.float32, self.device, generator)
            return noise_to(scheduler, clean.float(), first_timestep, noise)

    @staticmethod
    def _start_at_strength(scheduler, timesteps: torch.Tensor, strength: float) -> torch.Tensor:
        steps = len(timesteps)
        t_start = int(max(steps - min(steps * strength, steps), 0))
        begin = t_start * scheduler.order
        scheduler.set_begin_index(begin)
        return timesteps[begin:]

    def _denoise_step(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler,
        captions: list[torch.Tensor],
        negatives: list[torch.Tensor] | None,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        n = latents.shape[0]
        # Z-Image's model time runs 0 → 1 as the scheduler's t runs 1000 → 0.
        model_t = (1000 - t.expand(n)) / 1000
        with torch.inference_mode():
            if negatives is None:
                velocity = self.denoiser(latents, model_t, captions).float()
            else:
                both = self.denoiser(torch.cat([latents, latents]), model_t.repeat(2), captions + negatives).float()
                positive, negative = both[:n], both[n:]
                velocity = positive + guidance * (positive - negative)
            return scheduler.step(-velocity, t, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae_config = self.pipe.vae.config
        with torch.inference_mode():
            images = self.decoder(latents / vae_config.scaling_factor + vae_config.shift_factor)
        return [Image.fromarray(image) for image in images.cpu().numpy()]

    # -- hires-fix ----------------------------------------------------------------------

    def _run_hires(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: ProgressFn | None,
        is_cancelled: CancelFn | None,
    ) -> list[GenerationResult]:
        """Draw at the low bucket, upscale (Lanczos), then img2img at the target bucket."""
        hires = requests[0].hires
        assert hires is not None
        base = [replace(r, size=hires.base_size, hires=None) for r in requests]
        first = self.run_batch(base, on_progress, is_cancelled, pass_name="base")
        survivors = [(r, res) for r, res in zip(requests, first, strict=True) if not res.cancelled]
        second: dict[str, GenerationResult] = {}
        if survivors:
            refine = [
                replace(
                    r,
                    init_image=res.image.resize((r.size.width, r.size.height), Image.Resampling.LANCZOS),
                    strength=hires.denoise,
                    hires=None,
                )
                for r, res in survivors
            ]
            for res in self.run_batch(refine, on_progress, is_cancelled, pass_name="hires"):
                second[res.request_id] = res
        out = []
        for request, base_result in zip(requests, first, strict=True):
            final = second.get(request.request_id)
            if final is None:
                out.append(base_result)
                continue
            final.passes = base_result.passes + final.passes
            out.append(final)
        return out

    # -- checks -------------------------------------------------------------------------

    @staticmethod
    def _check_batch(requests: Sequence[GenerationRequest]) -> BatchKey:
        if not requests:
            raise ValueError("empty batch")
        key = requests[0].batch_key()
        for r in requests[1:]:
            if r.batch_key() != key:
                raise ValueError(f"request {r.request_id} is not batch-compatible: {r.batch_key()} != {key}")
        if key.strength is not None and int(key.steps * key.strength) < 1:
            raise InvalidRequest(
                f"strength {key.strength} leaves no denoising step out of {key.steps}",
                code="strength_too_low",
                param="strength",
            )
        return key
