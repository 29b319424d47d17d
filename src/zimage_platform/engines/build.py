"""Build compiled engines with their manifests, and verify them against torch.

``build`` exports into a staging folder and swaps it in whole, so a crashed build never leaves
a half-written engine that looks valid. An engine already built from the same checkpoint with
the same tools is reused (the three tiny variants share one checkpoint, hence one export).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from zimage_platform.engines.engine import (
    Backend,
    PipelineEngine,
    bucket_profiles,
    dynamic_profile,
    engine_folder,
    get_backend,
)
from zimage_platform.engines.export import ONNX_OPSET
from zimage_platform.engines.folders import files_intact, link_or_copy, staged_folder
from zimage_platform.engines.manifest import (
    EngineManifest,
    Verification,
    read_manifest,
    sha256_file,
    tool_versions,
    write_manifest,
)
from zimage_platform.errors import BackendUnavailable, InvalidRequest
from zimage_platform.pipeline.buckets import Resolution
from zimage_platform.pipeline.checkpoint import inspect_checkpoint, load_pipeline
from zimage_platform.pipeline.types import GenerationRequest

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

VERIFY_PROMPTS = ("a red fox in fresh snow, golden hour", "一只小猫坐在窗台上，阳光洒在它的毛发上")


def _select_buckets(config: PlatformConfig, variant: str, buckets: Sequence[str] | None) -> list[Resolution]:
    served = config.buckets_for(variant)
    if not buckets:
        return list(served)
    return [served.resolve(b, param="bucket") for b in buckets]


def build_engine(
    config: PlatformConfig,
    variant: str,
    backend: str,
    *,
    buckets: Sequence[str] | None = None,
    force: bool = False,
    checkpoint: Path | None = None,
    precision: str | None = None,
) -> EngineManifest:
    """Build (or reuse) the engine for ``variant`` on ``backend``; returns its manifest."""
    spec = config.variant(variant)
    precision = precision or spec.precision
    impl = get_backend(backend)
    if not impl.compiled:
        raise InvalidRequest(
            f"the {backend} backend runs the checkpoint directly; nothing to build",
            code="nothing_to_build",
            param="backend",
        )
    reason = impl.unavailable_reason()
    if reason:
        raise BackendUnavailable(reason, code=f"{backend}_unavailable")
    source = PipelineEngine(config, variant, backend, checkpoint=checkpoint).checkpoint_path()
    info = inspect_checkpoint(source)
    wanted = _select_buckets(config, variant, buckets)
    folder = engine_folder(config, variant, backend, precision)
    existing = read_manifest(folder)
    # A compiled profile set is fixed at build time: keep the buckets already there.
    if existing and existing.checkpoint_fingerprint == info.fingerprint and not force:
        keep = set(wanted) | {Resolution.parse(b) for b in existing.buckets}
        wanted = [b for b in config.buckets_for(variant) if b in keep]
    profiles = bucket_profiles(spec, wanted, config.engine.max_sequence_length)
    manifest = EngineManifest(
        variant=variant,
        backend=backend,
        precision=precision,
        checkpoint_source=str(checkpoint) if checkpoint is not None else spec.checkpoint,
        checkpoint_fingerprint=info.fingerprint,
        onnx_opset=ONNX_OPSET,
        tools=tool_versions(),
        profiles=profiles,
        dynamic_profile=dynamic_profile(spec, config.engine.max_sequence_length),
    )
    if not force and existing and _same_artifacts(existing, manifest, impl) and files_intact(folder, existing):
        if (existing.profiles, existing.dynamic_profile) != (manifest.profiles, manifest.dynamic_profile):
            existing.profiles = manifest.profiles  # only the advisory profiles changed
            existing.dynamic_profile = manifest.dynamic_profile
            write_manifest(folder, existing)
        return existing
    with staged_folder(folder, prefix=f".{backend}-") as staging:
        donor = None if force else _find_donor(config, manifest, impl)
        if donor is not None:
            donor_folder, donor_manifest = donor
            for name in donor_manifest.files:
                link_or_copy(donor_folder / name, staging / name)
            files = list(donor_manifest.files)
        else:
            pipe = load_pipeline(info.path, torch.float32)
            files = impl.build(pipe, staging, profiles, precision=precision, dynamic=manifest.dynamic_profile)
        manifest.files = {name: sha256_file(staging / name) for name in files}
        write_manifest(staging, manifest)
    return manifest


def _same_artifacts(a: EngineManifest, b: EngineManifest, backend: Backend) -> bool:
    """Would building ``b`` produce the files ``a`` already has?"""
    keys = ["backend", "precision", "checkpoint_fingerprint", "onnx_opset", "tools"]
    if backend.profiles_in_artifacts:
        keys += ["profiles", "dynamic_profile"]
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _find_donor(
    config: PlatformConfig, manifest: EngineManifest, backend: Backend
) -> tuple[Path, EngineManifest] | None:
    """Another variant's engine built from the same checkpoint, tools and profiles."""
    for other in config.variants:
        if other == manifest.variant:
            continue
        folder = engine_folder(config, other, manifest.backend, manifest.precision)
        candidate = read_manifest(folder)
        if candidate and _same_artifacts(candidate, manifest, backend) and files_intact(folder, candidate):
            return folder, candidate
    return None


# -- verification ---------------------------------------------------------------------------


def verification_image(size: Resolution) -> Image.Image:
    """A fixed, seed-free input image for verifying img2img variants."""
    y, x = np.mgrid[0 : size.height, 0 : size.width]
    rgb = np.stack([x * 255 // max(size.width - 1, 1), y * 255 // max(size.height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def verify_engine(
    config: PlatformConfig,
    variant: str,
    backend: str,
    *,
    buckets: Sequence[str] | None = None,
    tolerance: float | None = None,
    precision: str | None = None,
) -> list[Verification]:
    """Generate fixed seeds on torch and on ``backend``; compare pixels and one raw forward."""
    tolerance = config.engine.verify_tolerance if tolerance is None else tolerance
    spec = config.variant(variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = PipelineEngine(config, variant, "torch", device=device)
    candidate = PipelineEngine(config, variant, backend, precision=precision, device=device)
    reference.load()
    candidate.load()
    gpu = torch.cuda.is_available() and candidate.device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    results: list[Verification] = []
    for bucket in _select_buckets(config, variant, buckets):
        image = verification_image(bucket) if spec.mode == "img2img" else None
        batch = min(2, candidate.max_batch(bucket))
        requests = [
            GenerationRequest(
                prompt=VERIFY_PROMPTS[i % 2],
                size=bucket,
                seed=1000 + i,
                steps=spec.defaults.steps,
                guidance=spec.defaults.guidance,
                negative_prompt=spec.defaults.negative_prompt,
                sampler=spec.defaults.sampler,
                shift=spec.defaults.shift,
                init_image=image,
                strength=spec.defaults.strength if image is not None else 1.0,
                request_id=f"verify-{i}",
            )
            for i in range(batch)
        ]
        ref = reference.run(requests)
        got = candidate.run(requests)
        diffs = [
            np.abs(np.asarray(a.image, dtype=np.int16) - np.asarray(b.image, dtype=np.int16))
            for a, b in zip(ref, got, strict=True)
        ]
        velocity = _forward_difference(reference, candidate, bucket)
        max_diff = float(max(d.max() for d in diffs))
        results.append(
            Verification(
                bucket=str(bucket),
                max_pixel_diff=max_diff,
                mean_pixel_diff=float(np.mean([d.mean() for d in diffs])),
                max_velocity_diff=velocity,
                tolerance=tolerance,
                passed=max_diff <= tolerance,
            )
        )
    folder = engine_folder(config, variant, backend, candidate.precision)
    manifest = read_manifest(folder)
    if manifest is not None:
        done = {v.bucket for v in results}
        manifest.verification = [v for v in manifest.verification if v.bucket not in done] + results
        if gpu:
            manifest.peak_memory_gb = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        write_manifest(folder, manifest)
    return results


def _forward_difference(reference: PipelineEngine, candidate: PipelineEngine, bucket: Resolution) -> float:
    assert reference.pipeline is not None and candidate.pipeline is not None
    gen = torch.Generator().manual_seed(7)
    h, w = bucket.latent_shape
    latents = torch.randn(2, reference.pipeline.latent_channels, h, w, generator=gen)
    timestep = torch.tensor([0.2, 0.7])
    captions = reference.pipeline.encode_prompts(list(VERIFY_PROMPTS))
    with torch.inference_mode():
        a = reference.pipeline.denoiser(latents, timestep, captions).float().cpu()
        b = candidate.pipeline.denoiser(latents, timestep, captions).float().cpu()
    return float((a - b).abs().max())
