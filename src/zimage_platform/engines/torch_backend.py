"""The reference backend: diffusers' own transformer and VAE, eager PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from zimage_platform.pipeline.pipeline import to_uint8


class TorchDenoiser:
    def __init__(self, transformer) -> None:
        self.transformer = transformer

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, captions: list[torch.Tensor]) -> torch.Tensor:
        dtype = self.transformer.dtype
        rows = list(latents.to(dtype).unsqueeze(2).unbind(0))
        out = self.transformer(rows, timestep, captions, return_dict=False)[0]
        return torch.stack(out).squeeze(2)


class TorchDecoder:
    def __init__(self, vae) -> None:
        self.vae = vae

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0])


class TorchBackend:
    name: ClassVar[str] = "torch"
    compiled: ClassVar[bool] = False
    profiles_in_artifacts: ClassVar[bool] = False

    def unavailable_reason(self) -> str | None:
        return None

    def build(self, pipe, folder: Path, profiles, *, precision: str, dynamic=None) -> list[str]:
        return []

    def load(self, pipe, folder: Path, manifest, *, threads: int):
        return TorchDenoiser(pipe.transformer), TorchDecoder(pipe.vae)
