"""Checkpoints: find them (local folder or ``s3://``), check them, fingerprint them, load them.

Safetensors only. A pickle (``.bin``, ``.ckpt``, ``.pt`` ...) runs code when loaded, so a
checkpoint folder holding one is refused outright. Every safetensors file's header is checked
against its size before torch sees it, so a truncated or corrupted download gives an error
naming the file instead of a crash deep inside a loader.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage_platform.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
#: The diffusers folder layout of Tongyi-MAI/Z-Image-Turbo.
REQUIRED_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
_MAX_HEADER = 100 * 1024 * 1024
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    #: sha256 over every file's relative path and content: what engines are built from.
    fingerprint: str
    #: The same over the tokenizer and text encoder only (prompt-embedding cache identity).
    text_encoder_fingerprint: str


# -- locating -------------------------------------------------------------------------------


def fetch_s3_checkpoint(uri: str, cache_dir: Path, *, endpoint_url: str | None, region: str) -> Path:
    """Mirror ``s3://bucket/prefix`` into ``cache_dir`` (refusing pickles before downloading)."""
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region)
    keys: list[tuple[str, int]] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
    except Exception as exc:  # botocore raises many types; all mean "cannot read it"
        raise CheckpointError(f"cannot list {uri}: {exc}", code="checkpoint_unreachable") from exc
    if not keys:
        raise CheckpointError(f"no objects under {uri}", code="checkpoint_missing")
    for key, _ in keys:
        if key.lower().endswith(PICKLE_SUFFIXES):
            raise _pickle_error(f"s3://{bucket}/{key}")
    local = cache_dir / bucket / prefix.rstrip("/")
    for key, size in keys:
        target = local / key[len(prefix) :]
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        try:
            s3.download_file(bucket, key, str(partial))
        except Exception as exc:
            raise CheckpointError(f"cannot download s3://{bucket}/{key}: {exc}", code="checkpoint_unreachable") from exc
        partial.replace(target)
    return local


# -- checking -------------------------------------------------------------------------------


def _pickle_error(name: str) -> CheckpointError:
    return CheckpointError(
        f"{name} is a pickle file; only safetensors checkpoints are loaded (pickles can run code). "
        "Convert it to .safetensors or remove it.",
        code="checkpoint_unsafe_format",
    )


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's framing: header length, JSON header, offsets within the file."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}", code="checkpoint_corrupt") from exc
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            _, stop = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has no data offsets", code="checkpoint_corrupt") from None
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path} is truncated or padded: tensors end at byte {8 + n + end}, file has {size}",
            code="checkpoint_corrupt",
        )


def validate_checkpoint(path: Path) -> None:
    """Refuse pickles anywhere, and check every JSON and safetensors file the loader will read."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist", code="checkpoint_missing")
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name.lower().endswith(PICKLE_SUFFIXES):
            raise _pickle_error(str(file))
    index = path / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{index} is missing: not a diffusers checkpoint folder", code="checkpoint_missing")
    components = _read_json(index)
    for name in REQUIRED_COMPONENTS:
        if name not in components or not (path / name).is_dir():
            raise CheckpointError(f"{path} has no {name}/ component", code="checkpoint_missing")
    for file in sorted(path.rglob("*.json")):
        _read_json(file)
    for name in ("transformer", "text_encoder", "vae"):
        weights = sorted((path / name).glob("*.safetensors"))
        if not weights:
            raise CheckpointError(f"{path / name} holds no .safetensors weights", code="checkpoint_missing")
        for file in weights:
            check_safetensors(file)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}", code="checkpoint_corrupt") from exc


# -- fingerprinting -------------------------------------------------------------------------


def fingerprint(path: Path, subdirs: tuple[str, ...] | None = None) -> str:
    """sha256 over (relative path, content sha256) of every file, in sorted order."""
    outer = hashlib.sha256()
    roots = [path / d for d in subdirs] if subdirs else [path]
    for root in roots:
        for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".part")):
            inner = hashlib.sha256()
            with file.open("rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    inner.update(chunk)
            outer.update(file.relative_to(path).as_posix().encode())
            outer.update(inner.digest())
    return outer.hexdigest()


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    validate_checkpoint(path)
    return CheckpointInfo(
        path=path,
        fingerprint=fingerprint(path),
        text_encoder_fingerprint=fingerprint(path, ("tokenizer", "text_encoder")),
    )


# -- loading --------------------------------------------------------------------------------


def load_pipeline(path: Path, dtype: torch.dtype = torch.float32):
    """Load diffusers' ``ZImagePipeline`` from a checked folder (safetensors only)."""
    from diffusers import ZImagePipeline

    validate_checkpoint(path)
    try:
        pipe = ZImagePipeline.from_pretrained(path, use_safetensors=True, dtype=dtype)
    except Exception as exc:  # the loaders raise anything from OSError to KeyError
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}", code="checkpoint_corrupt") from exc
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.text_encoder, pipe.vae):
        module.eval().requires_grad_(False)
    return pipe


def resolve_checkpoint(ref: str, *, tiny_dir: Path, s3_cache_dir: Path, endpoint_url: str | None, region: str) -> Path:
    """Turn a spec's ``checkpoint`` (``tiny``, a folder, or ``s3://...``) into a local folder."""
    if ref == "tiny":
        from zimage_platform.pipeline.tiny import init_tiny_checkpoint

        return init_tiny_checkpoint(tiny_dir)
    if ref.startswith("s3://"):
        return fetch_s3_checkpoint(ref, s3_cache_dir, endpoint_url=endpoint_url, region=region)
    return Path(ref).expanduser()
