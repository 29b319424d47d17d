"""The Z-Image pipeline: checkpoints, buckets, samplers, and batched generation.

Public surface (imported lazily: the torch-heavy parts load only when first used, so light
callers such as the HTTP ingress can use buckets and params without importing torch):
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Resolution": "buckets",
    "BucketSet": "buckets",
    "GenerationParams": "params",
    "resolve_requests": "params",
    "GenerationRequest": "types",
    "GenerationResult": "types",
    "HiresFix": "types",
    "StepEvent": "types",
    "BatchKey": "types",
    "ZImageBatchPipeline": "pipeline",
    "SAMPLERS": "samplers",
    "SCHEDULES": "schedules",
    "init_tiny_checkpoint": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
