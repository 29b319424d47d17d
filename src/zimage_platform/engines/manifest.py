"""Engine manifests: what a built engine is, what it was built from, and whether it still fits.

A manifest sits beside the artifacts (``<build>/<variant>/<backend>/manifest.json``), like a
Triton model's ``config.pbtxt``. Serving refuses an engine whose manifest names another
checkpoint, lacks a bucket it must serve, or whose files no longer hash as recorded.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, Field

from zimage_platform.errors import EngineError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_TOOLS = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "tensorrt")


class BucketProfile(BaseModel):
    """Shapes one bucket is compiled for (a TensorRT optimisation profile; advisory for ONNX)."""

    bucket: str
    #: Requests per engine call; the denoiser sees up to twice as many rows with CFG.
    max_batch: int
    denoiser_batch: tuple[int, int, int]
    caption_len: tuple[int, int, int]


class DynamicProfile(BaseModel):
    """Sizes outside the buckets: one TensorRT optimisation profile over a range of sizes
    (``WIDTHxHEIGHT`` min / opt / max; each side varies on its own), with its batch range."""

    min_size: str
    opt_size: str
    max_size: str
    max_batch: int
    denoiser_batch: tuple[int, int, int]
    caption_len: tuple[int, int, int]


class Verification(BaseModel):
    bucket: str
    max_pixel_diff: float
    mean_pixel_diff: float
    max_velocity_diff: float
    tolerance: float
    passed: bool


class EngineManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    variant: str
    backend: str
    precision: str
    checkpoint_source: str
    checkpoint_fingerprint: str
    onnx_opset: int | None = None
    tools: dict[str, str] = Field(default_factory=dict)
    profiles: list[BucketProfile] = Field(default_factory=list)
    #: The dynamic-shape profile for sizes outside the buckets (``None``: buckets only).
    dynamic_profile: DynamicProfile | None = None
    #: Artifact file name → sha256.
    files: dict[str, str] = Field(default_factory=dict)
    #: Peak accelerator memory measured while verifying (GB); pools check their slices against it.
    peak_memory_gb: float | None = None
    verification: list[Verification] = Field(default_factory=list)

    @property
    def buckets(self) -> list[str]:
        return [p.bucket for p in self.profiles]

    def profile(self, bucket: str) -> BucketProfile | None:
        return next((p for p in self.profiles if p.bucket == bucket), None)


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: EngineManifest) -> Path:
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_manifest(folder: Path) -> EngineManifest | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return EngineManifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise EngineError(f"{path} is not a valid engine manifest: {exc}", code="engine_manifest_invalid") from exc


def check_manifest(
    folder: Path,
    manifest: EngineManifest | None,
    *,
    checkpoint_fingerprint: str,
    buckets: list[str],
    verify_files: bool = True,
) -> EngineManifest:
    """Refuse an engine that is missing, built from another checkpoint, short of a bucket, or altered."""
    where = f"{folder}"
    if manifest is None:
        raise EngineError(f"no engine built in {where}", code="engine_not_built")
    if manifest.format_version != FORMAT_VERSION:
        raise EngineError(
            f"{where}: manifest format {manifest.format_version} is not {FORMAT_VERSION}",
            code="engine_manifest_invalid",
        )
    if manifest.checkpoint_fingerprint != checkpoint_fingerprint:
        raise EngineError(
            f"{where} was built from checkpoint {manifest.checkpoint_fingerprint[:12]}…, "
            f"not the configured one ({checkpoint_fingerprint[:12]}…); rebuild it",
            code="engine_checkpoint_mismatch",
        )
    missing = sorted(set(buckets) - set(manifest.buckets))
    if missing:
        raise EngineError(
            f"{where} has no profile for buckets {missing}", code="engine_bucket_missing", choices=manifest.buckets
        )
    if verify_files:
        for name, digest in manifest.files.items():
            path = folder / name
            if not path.is_file():
                raise EngineError(f"{path} is missing", code="engine_corrupt")
            if sha256_file(path) != digest:
                raise EngineError(f"{path} does not match its manifest hash", code="engine_corrupt")
    return manifest
