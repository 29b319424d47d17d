"""The ``Engine`` interface the serving layer calls, and its one implementation.

An engine is a variant's checkpoint loaded on one backend: the shared pipeline (text encoder,
schedulers, latent preparation) with the backend's denoiser and VAE decoder plugged in.
Backends differ only in those two pieces, so every backend gets batching, cancellation,
progress and hires-fix from the same code.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil
import torch

from zimage_platform.engines.manifest import (
    BucketProfile,
    DynamicProfile,
    EngineManifest,
    check_manifest,
    read_manifest,
)
from zimage_platform.engines.onnxruntime_backend import OnnxRuntimeBackend
from zimage_platform.engines.tensorrt_backend import TensorRTBackend
from zimage_platform.engines.torch_backend import TorchBackend
from zimage_platform.errors import BackendUnavailable, EngineError, InvalidRequest
from zimage_platform.pipeline.buckets import BucketSet, Resolution
from zimage_platform.pipeline.checkpoint import (
    CheckpointInfo,
    inspect_checkpoint,
    load_pipeline,
    resolve_checkpoint,
)
from zimage_platform.pipeline.pipeline import BatchPipeline, ZImageBatchPipeline
from zimage_platform.pipeline.prompt_cache import PromptEmbeddingCache
from zimage_platform.pipeline.types import CancelFn, GenerationRequest, GenerationResult, ProgressFn

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig, VariantSpec

log = logging.getLogger(__name__)

BACKENDS = {b.name: b for b in (TorchBackend(), OnnxRuntimeBackend(), TensorRTBackend())}


class Backend(Protocol):
    name: str
    #: Needs ``engines build`` before it can serve.
    compiled: bool
    #: Its built files depend on the bucket profiles (TensorRT plans), not just the checkpoint.
    profiles_in_artifacts: bool

    def unavailable_reason(self) -> str | None: ...
    def build(
        self,
        pipe,
        folder: Path,
        profiles: list[BucketProfile],
        *,
        precision: str,
        dynamic: DynamicProfile | None = None,
    ) -> list[str]: ...
    def load(self, pipe, folder: Path, manifest: EngineManifest | None, *, threads: int): ...


class Engine(Protocol):
    """What a serving replica needs from a loaded model (:class:`PipelineEngine`, or the
    benchmarks' :class:`~zimage_platform.engines.simulated.SimulatedEngine`)."""

    variant: str
    backend: str
    spec: VariantSpec
    #: The sizes it serves: compiled buckets, and the variant's rule for the rest.
    sizes: BucketSet
    #: ``None`` until :meth:`load` has run (health checks read it).
    pipeline: BatchPipeline | None

    def load(self) -> None: ...
    def warmup(self, sizes: list[str] | None = None) -> None: ...
    def canary(self) -> None: ...
    def max_batch(self, bucket: Resolution) -> int: ...
    def run(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: ProgressFn | None = None,
        is_cancelled: CancelFn | None = None,
        *,
        encode: bool = True,
    ) -> list[GenerationResult]: ...
    def memory(self) -> MemoryReport: ...


@dataclass
class MemoryReport:
    rss_bytes: int
    peak_rss_bytes: int
    gpu_allocated_bytes: int
    gpu_peak_bytes: int
    prompt_cache_bytes: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


#: The benchmarks-only engine that sleeps a latency model's time instead of running a model
#: (:mod:`zimage_platform.engines.simulated`): an engine, not a compute backend, so not in BACKENDS.
SIMULATED = "simulated"


def get_backend(name: str) -> Backend:
    if name == SIMULATED:
        raise InvalidRequest(
            "the simulated engine has no compute backend (no model, nothing to build or run locally); "
            "it serves benchmarks only, through create_engine",
            code="simulated_backend",
            param="backend",
            choices=sorted(BACKENDS),
        )
    try:
        return BACKENDS[name]
    except KeyError:
        raise InvalidRequest(
            f"unknown backend {name!r}", code="unknown_backend", param="backend", choices=sorted(BACKENDS)
        ) from None


def is_compiled(backend: str) -> bool:
    """Needs ``engines build`` before it can serve (the simulated engine needs nothing)."""
    return backend != SIMULATED and get_backend(backend).compiled


def create_engine(config: PlatformConfig, variant: str, pool: str, *, device: str = "cpu") -> Engine:
    """The engine a serving replica of ``pool`` runs for ``variant``: the config's backend at the
    pool's precision, or, with ``engine.backend: simulated``, the benchmarks-only simulated engine."""
    if config.engine.backend == SIMULATED:
        from zimage_platform.engines.simulated import SimulatedEngine

        return SimulatedEngine(config, variant, pool)
    return PipelineEngine(config, variant, device=device, precision=config.precision_in(pool, variant))


def dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """Torch weights dtype: fp32 on CPU; the compute precision on a GPU (fp8 loads as bf16)."""
    if device.type == "cpu":
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[precision]


def bucket_profiles(spec: VariantSpec, buckets: Sequence[Resolution], max_sequence_length: int) -> list[BucketProfile]:
    caption_max = -(-max_sequence_length // 32) * 32
    profiles = []
    for bucket in buckets:
        b = spec.batch.for_bucket(bucket)
        profiles.append(
            BucketProfile(
                bucket=str(bucket),
                max_batch=b,
                denoiser_batch=(1, b, 2 * b),
                caption_len=(32, min(128, caption_max), caption_max),
            )
        )
    return profiles


def dynamic_profile(spec: VariantSpec, max_sequence_length: int) -> DynamicProfile:
    """The range every size the variant's rule allows falls in (optimised for its default size)."""
    caption_max = -(-max_sequence_length // 32) * 32
    lim, b = spec.limits, spec.batch.dynamic_max_batch
    return DynamicProfile(
        min_size=f"{lim.min_side}x{lim.min_side}",
        opt_size=spec.defaults.size,
        max_size=f"{lim.max_side}x{lim.max_side}",
        max_batch=b,
        denoiser_batch=(1, b, 2 * b),
        caption_len=(32, min(128, caption_max), caption_max),
    )


def engine_folder(config: PlatformConfig, variant: str, backend: str, precision: str | None = None) -> Path:
    """``<build>/<variant>/<backend>-<precision>``: one variant may run fp8 in one pool, bf16 in another."""
    return config.paths.engine_build_dir / variant / f"{backend}-{precision or config.variant(variant).precision}"


class BatchEngine:
    """What every engine shares: the variant's buckets and batch caps, checks on what it is
    asked to run, one batch at a time, warm-up and canary. ``load()`` sets :attr:`pipeline`."""

    def __init__(self, config: PlatformConfig, variant: str, backend: str) -> None:
        self.config = config
        self.variant = variant
        self.spec = config.variant(variant)
        self.backend = backend
        self.sizes = config.buckets_for(variant)
        #: Compiled sizes (warmed up, a TensorRT profile each); other allowed sizes run dynamic.
        self.buckets = list(self.sizes)
        self.pipeline: BatchPipeline | None = None
        self._lock = threading.Lock()
        self.loaded_at: float | None = None

    def load(self) -> None:
        raise NotImplementedError

    def warmup(self, sizes: list[str] | None = None) -> None:
        """One single-step generation per bucket (or per ``sizes``): first-call allocations and
        kernel selection happen now, not on a user's request."""
        buckets = [Resolution.parse(s) for s in sizes] if sizes else self.buckets
        for bucket in buckets:
            self.run([GenerationRequest(prompt="warm up", size=bucket, seed=0, steps=1)])

    def canary(self) -> None:
        """A cheap end-to-end check (smallest bucket, one step) that the engine still answers."""
        smallest = min(self.buckets, key=lambda b: b.pixels)
        (result,) = self.run([GenerationRequest(prompt="canary", size=smallest, seed=0, steps=1)])
        if result.png is None:
            raise EngineError("canary generation produced no image", code="engine_unhealthy")

    # -- work ---------------------------------------------------------------------------

    def max_batch(self, bucket: Resolution) -> int:
        return self.spec.max_batch(bucket, self.sizes)

    def run(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: ProgressFn | None = None,
        is_cancelled: CancelFn | None = None,
        *,
        encode: bool = True,
    ) -> list[GenerationResult]:
        if self.pipeline is None:
            raise EngineError(f"engine {self.variant}/{self.backend} is not loaded", code="engine_not_loaded")
        for r in requests:
            self.sizes.resolve(r.size)  # a bucket, or a size the variant's rule allows
        by_size: dict[Resolution, int] = {}
        for r in requests:
            by_size[r.size] = by_size.get(r.size, 0) + 1
        for size, count in by_size.items():
            if count > self.max_batch(size):
                raise EngineError(
                    f"{count} requests at {size} exceed the engine's max batch {self.max_batch(size)}",
                    code="batch_too_large",
                )
        # One batch at a time per engine: a second caller waits instead of oversubscribing cores.
        with self._lock:
            return self.pipeline.generate(requests, on_progress, is_cancelled, encode=encode)


class PipelineEngine(BatchEngine):
    """A variant on a backend. ``load()`` is separate so replicas can report progress while loading."""

    def __init__(
        self,
        config: PlatformConfig,
        variant: str,
        backend: str | None = None,
        *,
        checkpoint: Path | None = None,
        device: str = "cpu",
        precision: str | None = None,
    ) -> None:
        super().__init__(config, variant, backend or config.engine.backend)
        self.precision = precision or self.spec.precision
        self._backend = get_backend(self.backend)
        self.device = torch.device(device)
        self._checkpoint_override = checkpoint
        self.checkpoint: CheckpointInfo | None = None
        self.manifest: EngineManifest | None = None
        self.pipeline: ZImageBatchPipeline | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def load(self) -> None:
        reason = self._backend.unavailable_reason()
        if reason:
            raise BackendUnavailable(reason, code=f"{self.backend}_unavailable")
        if self.config.engine.threads:
            torch.set_num_threads(self.config.engine.threads)
        self.checkpoint = inspect_checkpoint(self.checkpoint_path())
        pipe = load_pipeline(self.checkpoint.path, dtype_for(self.precision, self.device))
        pipe.to(self.device)
        folder = engine_folder(self.config, self.variant, self.backend, self.precision)
        if self._backend.compiled:
            self.manifest = check_manifest(
                folder,
                read_manifest(folder),
                checkpoint_fingerprint=self.checkpoint.fingerprint,
                buckets=[str(b) for b in self.buckets],
            )
        denoiser, decoder = self._backend.load(pipe, folder, self.manifest, threads=self.config.engine.threads)
        cache = PromptEmbeddingCache(self.config.engine.prompt_cache_bytes, self.checkpoint.text_encoder_fingerprint)
        self.pipeline = ZImageBatchPipeline(
            pipe,
            denoiser,
            decoder,
            cache,
            max_sequence_length=self.config.engine.max_sequence_length,
            device=self.device,
            png_compress_level=self.config.engine.png_compress_level,
        )
        self.loaded_at = time.time()

    def checkpoint_path(self) -> Path:
        if self._checkpoint_override is not None:
            return self._checkpoint_override
        paths, store = self.config.paths, self.config.model_store
        return resolve_checkpoint(
            self.spec.checkpoint,
            tiny_dir=paths.tiny_checkpoint,
            s3_cache_dir=paths.checkpoint_cache,
            endpoint_url=store.endpoint_url,
            region=store.region,
        )

    def memory(self) -> MemoryReport:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cuda = torch.cuda.is_available() and self.device.type == "cuda"
        return MemoryReport(
            rss_bytes=psutil.Process().memory_info().rss,
            peak_rss_bytes=usage.ru_maxrss * 1024,
            gpu_allocated_bytes=torch.cuda.memory_allocated() if cuda else 0,
            gpu_peak_bytes=torch.cuda.max_memory_allocated() if cuda else 0,
            prompt_cache_bytes=self.pipeline.prompt_cache.stats.bytes if self.pipeline else 0,
        )
