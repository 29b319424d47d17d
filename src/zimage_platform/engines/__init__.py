"""Engines: a variant's checkpoint loaded on a backend (torch, onnxruntime, tensorrt).

Public surface: :class:`Engine` (the protocol serving calls), :class:`PipelineEngine` (its
implementation), :func:`build_engine` / :func:`verify_engine`, and :data:`BACKENDS`.
"""

from zimage_platform.engines.build import build_engine, verify_engine
from zimage_platform.engines.engine import (
    BACKENDS,
    Engine,
    MemoryReport,
    PipelineEngine,
    engine_folder,
    get_backend,
)
from zimage_platform.engines.manifest import EngineManifest, read_manifest

__all__ = [
    "BACKENDS",
    "Engine",
    "EngineManifest",
    "MemoryReport",
    "PipelineEngine",
    "build_engine",
    "engine_folder",
    "get_backend",
    "read_manifest",
    "verify_engine",
]
