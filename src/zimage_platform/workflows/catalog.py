"""Model file names for ComfyUI loaders, derived from the platform's variants.

A ComfyUI workflow names files (``z_image_turbo_bf16.safetensors``); the platform serves variants
(``turbo``). Every variant a tenant may use appears under four ComfyUI folders: as a full
checkpoint and a diffusion model (both name the variant), and its text encoder and VAE (which
belong to the variant's checkpoint: components of one checkpoint are interchangeable, those of
another are refused). Besides the platform's own names (``z_image_<variant>[_text_encoder|_vae]``)
a variant answers to the file names in its spec's ``comfy_files`` — Comfy-Org's published bf16,
fp8 and int8 files — so the workflows ComfyUI users share run unchanged. A diffusion model or
checkpoint file names exactly one variant; a text encoder or VAE file may be listed by several
variants (Turbo and Base ship the same ``qwen_3_4b`` and ``ae`` files).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from zimage_platform.workflows.nodes import Catalog

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig
    from zimage_platform.tenancy import TenantSpec

#: ComfyUI's model folders the platform fills (``GET /models`` lists them).
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "text_encoders", "vae")
#: Folders whose files select the variant (the others are components of a variant).
MODEL_SELECTING = ("checkpoints", "diffusion_models")
_SUFFIX = {"checkpoints": "", "diffusion_models": "", "text_encoders": "_text_encoder", "vae": "_vae"}


def model_file(variant: str, folder: str) -> str:
    """The platform's own file name a loader uses for ``variant`` in ``folder``."""
    return f"z_image_{variant}{_SUFFIX[folder]}.safetensors"


def build_catalog(
    config: PlatformConfig, tenant: TenantSpec | None, images: Mapping[str, tuple[int, int]] | None = None
) -> Catalog:
    """Model lists limited to the tenant's allowed variants, plus its uploaded images."""
    allowed = tenant.limits.allowed_variants if tenant is not None else []
    variants = [v for v in sorted(config.variants) if not allowed or v in allowed]
    catalog = Catalog(images=dict(images or {}))
    for folder in MODEL_FOLDERS:
        names: list[str] = []
        for variant in variants:
            spec = config.variant(variant)
            for name in [model_file(variant, folder), *spec.comfy_files.get(folder, [])]:
                owners = catalog.files.setdefault((folder, name), [])
                owners.append((variant, spec.checkpoint))
                if name not in names:
                    names.append(name)
                if folder in MODEL_SELECTING:
                    catalog.models[name] = (variant, spec.checkpoint)
        catalog.lists[folder] = sorted(names)
    catalog.lists["input_images"] = sorted(catalog.images)
    return catalog
