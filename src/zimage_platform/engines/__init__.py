"""Engines: a variant's checkpoint loaded on a backend (torch, onnxruntime, tensorrt).

Public surface: :class:`Engine` (the protocol serving calls), :class:`PipelineEngine` (its
implementation), :func:`create_engine` (what a serving replica runs: a ``PipelineEngine``, or the
benchmarks-only simulated engine), :func:`build_engine` / :func:`verify_engine`, and :data:`BACKENDS`.
"""

from zimage_platform.engines.build import build_engine, verify_engine
from zimage_platform.engines.engine import (
    BACKENDS,
    Engine,
    MemoryReport,
    PipelineEngine,
    create_engine,
    engine_folder,
    get_backend,
    is_compiled,
)
from zimage_platform.engines.manifest import EngineManifest, read_manifest

__all__ = [
    "BACKENDS",
    "Engine",
    "EngineManifest",
    "MemoryReport",
    "PipelineEngine",
    "build_engine",
    "create_engine",
    "engine_folder",
    "get_backend",
    "is_compiled",
    "read_manifest",
    "verify_engine",
]
