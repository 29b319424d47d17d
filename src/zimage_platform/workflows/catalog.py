"""Model file names for ComfyUI loaders, derived from the platform's variants.

A ComfyUI workflow names files (``z_image_turbo.safetensors``); the platform serves variants
(``turbo``). Every variant a tenant may use appears under four ComfyUI folders: as a full
checkpoint and a diffusion model (both name the variant), and its text encoder and VAE (which
belong to the variant's checkpoint: components of one checkpoint are interchangeable, those of
another are refused).
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
_SUFFIX = {"checkpoints": "", "diffusion_models": "", "text_encoders": "_text_encoder", "vae": "_vae"}


def model_file(variant: str, folder: str) -> str:
    """The file name a loader uses for ``variant`` in ``folder``."""
    return f"z_image_{variant}{_SUFFIX[folder]}.safetensors"


def build_catalog(
    config: PlatformConfig, tenant: TenantSpec | None, images: Mapping[str, tuple[int, int]] | None = None
) -> Catalog:
    """Model lists limited to the tenant's allowed variants, plus its uploaded images."""
    allowed = tenant.limits.allowed_variants if tenant is not None else []
    variants = [v for v in sorted(config.variants) if not allowed or v in allowed]
    catalog = Catalog(images=dict(images or {}))
    for folder in MODEL_FOLDERS:
        catalog.lists[folder] = [model_file(v, folder) for v in variants]
        for variant in variants:
            catalog.models[model_file(variant, folder)] = (variant, config.variant(variant).checkpoint)
    catalog.lists["input_images"] = sorted(catalog.images)
    return catalog
