"""The ``simulated`` engine — FOR BENCHMARKS ONLY: it loads no model and generates nothing.

Each batch sleeps the time a GPU latency model gives for it (the capacity planner's own
models, :mod:`zimage_platform.scheduling.simulation.latency`: batch size, bucket, steps, CFG,
MIG slice, precision), split into the real pipeline's stages and denoising steps, so progress
events, cancellation at step boundaries, stage spans and metrics, batching and hires-fix behave
as on a real engine (the batching and hires-fix code is the real pipeline's:
:class:`~zimage_platform.pipeline.pipeline.BatchPipeline`). Every image is a placeholder: a flat
colour and a few blocks drawn from the prompt, seed and size, labelled SIMULATED in its pixels
and its PNG text. Sleeping holds no GIL and burns no CPU, so on a CPU machine the platform's own
path (HTTP, scheduler, database, S3) can be measured against GPU-sized engine times without
the engines competing for the cores.

``engine.backend: simulated`` requires ``engine.simulated.acknowledge_not_real: true``; the
backend name, ``/v1/models``, every bill (``backend``) and a warning at load say ``simulated``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
from PIL import Image, ImageDraw

from zimage_platform.engines.engine import SIMULATED, BatchEngine, MemoryReport
from zimage_platform.errors import EngineError, InvalidRequest
from zimage_platform.pipeline.images import encode_png
from zimage_platform.pipeline.pipeline import BatchPipeline
from zimage_platform.pipeline.types import (
    CancelFn,
    GenerationRequest,
    GenerationResult,
    PassTimings,
    ProgressFn,
    StageMark,
    StepEvent,
)
from zimage_platform.scheduling.simulation.latency import ComputeModel, LatencyModel, load_latency
from zimage_platform.scheduling.work import WorkKey

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

log = logging.getLogger(__name__)

#: PNG text chunk of every simulated image: no reader can take one for a generation.
PNG_TEXT = {"Software": "zimage-platform simulated engine (benchmarks only; not a generation)"}


@dataclass(frozen=True)
class StageSeconds:
    """One batch's engine time, by the real pipeline's stages (they add up to the model's time)."""

    text_encode: float
    denoise: float
    decode: float
    png_encode: float

    @property
    def total(self) -> float:
        return self.text_encode + self.denoise + self.decode + self.png_encode


class SimulatedLatency:
    """The latency model as one engine replica of ``pool`` sees it: seconds per batch, and how a
    batch's seconds split into stages. The slice and precision emulated come from
    ``engine.simulated`` (else the pool's MIG profile and precision); a CPU pool emulates a slice."""

    def __init__(self, config: PlatformConfig, pool: str, variant: str) -> None:
        settings = config.engine.simulated
        if pool not in config.pools:
            raise InvalidRequest(
                f"the simulated engine serves pool {pool!r}, which the config does not define",
                code="unknown_pool",
                param="pool",
                choices=sorted(config.pools),
            )
        path = settings.latency
        if not path.is_file():
            raise EngineError(
                f"the simulated engine's latency model {path} does not exist (resolved: {path.resolve()}); "
                "set engine.simulated.latency to a compute-model file (ops/latency/*.yaml), a measured table "
                "or a `bench engine` JSON",
                code="simulated_latency_missing",
                param="engine.simulated.latency",
            )
        model = load_latency(path, config)
        self.pool, self.variant, self.source = pool, variant, str(path)
        self.slice: str | None = None
        self.precision: str | None = None
        if isinstance(model, ComputeModel):
            model = self._emulate(model, config, settings.slice, settings.precision)
        self.model: LatencyModel = model

    def _emulate(
        self, model: ComputeModel, config: PlatformConfig, slice_: str | None, precision: str | None
    ) -> ComputeModel:
        """The compute model on a copy of the config whose pool is the emulated slice."""
        pool = config.pools[self.pool]
        params = model.params
        slices = sorted(set(params.slice_sms) | set(params.achieved_tflops))
        slice_ = slice_ or pool.mig_profile or ("gpu" if pool.num_gpus > 0 else None)
        if slice_ is None:
            raise InvalidRequest(
                f"pool {self.pool!r} has no MIG profile and no GPU: set engine.simulated.slice to the slice "
                f"the simulated engine emulates ({self.source} knows {', '.join(slices)})",
                code="simulated_slice_missing",
                param="engine.simulated.slice",
                choices=slices,
            )
        if slice_ not in slices:
            raise InvalidRequest(
                f"{self.source} has no figures for slice {slice_!r}",
                code="unknown_slice",
                param="engine.simulated.slice",
                choices=slices,
            )
        precision = precision or config.precision_in(self.pool, self.variant)
        precisions = sorted(set(params.peak_tflops) | set(params.achieved_tflops.get(slice_, {})))
        if precision not in precisions:
            raise InvalidRequest(
                f"{self.source} has no figures for precision {precision!r} on {slice_} "
                "(set engine.simulated.precision, or the pool's precision)",
                code="unsupported_precision",
                param="engine.simulated.precision",
                choices=precisions,
            )
        self.slice, self.precision = slice_, precision
        emulated = pool.model_copy(update={"mig_profile": slice_, "precision": precision})
        return model.for_config(config.model_copy(update={"pools": {**config.pools, self.pool: emulated}}))

    def key(self, size: str, steps: int, *, cfg: bool = False, sampler: str = "euler", shift: float = 3.0) -> WorkKey:
        return WorkKey(self.variant, size, steps, cfg, sampler, shift, None, None)

    def batch_seconds(self, key: WorkKey, batch: int) -> float:
        try:
            return self.model.batch_seconds(self.pool, key, batch)
        except ValueError as exc:  # a measured table without this bucket
            measured = sorted(getattr(self.model, "points", {}))
            raise InvalidRequest(
                f"the simulated engine's latency model cannot time {key.size}: {exc}",
                code="unsupported_size",
                param="size",
                choices=measured or None,
            ) from None

    def batch_gain(self, key: WorkKey, batch: int) -> float:
        """The model's own throughput gain of one batch over ``batch`` single calls."""
        return batch * self.batch_seconds(key, 1) / self.batch_seconds(key, batch)

    def stages(self, key: WorkKey, batch: int) -> StageSeconds:
        """A compute model splits its time as it computes it (text encoder and VAE FLOPs, the
        host's PNG and upload time per image, the rest denoising); other models' time is all
        denoising."""
        total = self.batch_seconds(key, batch)
        if not isinstance(self.model, ComputeModel):
            return StageSeconds(0.0, total, 0.0, 0.0)
        flops = self.model.image_flops(key)
        rate = self.model.tflops(self.pool, key.variant) * 1e12
        text, decode = batch * flops["text_encoder"] / rate, batch * flops["vae_decode"] / rate
        png = batch * self.model.params.host_s_per_image
        return StageSeconds(text, total - text - decode - png, decode, png)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": SIMULATED,
            "not_real": True,
            "latency": self.source,
            "kind": self.model.describe()["kind"],
            "pool": self.pool,
            "slice": self.slice,
            "precision": self.precision,
        }


def placeholder_image(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """A deterministic stand-in image: a flat colour and four blocks from a hash of prompt, seed
    and size, with SIMULATED written on it. Cheap to draw and to encode at any size."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{width}x{height}".encode()).digest()
    image = Image.new("RGB", (width, height), (digest[0], digest[1], digest[2]))
    draw = ImageDraw.Draw(image)
    rng = random.Random(digest)
    for _ in range(4):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randrange(1, width // 2 + 2))
        y1 = min(height, y0 + rng.randrange(1, height // 2 + 2))
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw.text((1, 1), "SIMULATED", fill=(255 - digest[0], 255 - digest[1], 255 - digest[2]))
    return image


class SimulatedPipeline(BatchPipeline):
    """One batch's loop in model time: each stage and step ends at a deadline on the batch's
    clock, so the batch takes the model's time however long the placeholder work took (as long
    as it fits). A member cancelled at a step boundary leaves the batch, and the remaining steps
    take the smaller batch's time, as on a GPU."""

    def __init__(
        self,
        latency: SimulatedLatency,
        *,
        png_compress_level: int = 1,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.latency = latency
        self.png_compress_level = png_compress_level
        self.clock, self.sleep = clock, sleep

    def _until(self, deadline: float) -> None:
        remaining = deadline - self.clock()
        if remaining > 0:
            self.sleep(remaining)  # time.sleep releases the GIL and takes no CPU

    def run_batch(
        self,
        requests: Sequence[GenerationRequest],
        on_progress: ProgressFn | None = None,
        is_cancelled: CancelFn | None = None,
        *,
        pass_name: str = "generate",
        encode: bool = True,
    ) -> list[GenerationResult]:
        key = self._check_batch(requests)
        is_cancelled = is_cancelled or (lambda _: False)
        steps = key.steps - (self.first_step(key.steps, key.strength) if key.strength is not None else 0)
        work = WorkKey(self.latency.variant, str(key.size), steps, key.cfg, key.sampler, key.shift, key.strength, None)
        timings = PassTimings(name=pass_name, size=key.size, batch_size=len(requests))
        alive = list(range(len(requests)))
        stages = self.latency.stages(work, len(alive))
        # Stage times and marks on the pipeline's clock (the wall clock unless a test gives one).
        # Stages are contiguous, each starting where the last ended, so they add up to the batch's time.
        origin, origin_ns = self.clock(), time.time_ns()
        mark = origin

        def stage(name: str, end: float | None = None, **attributes: Any) -> None:
            nonlocal mark
            end = self.clock() if end is None else end
            if name != "denoise":  # PassTimings sums its steps
                setattr(timings, f"{name}_s", end - mark)
            wall = (origin_ns + int((mark - origin) * 1e9), origin_ns + int((end - origin) * 1e9))
            timings.marks.append(StageMark(name, *wall, attributes))
            mark = end

        deadline = origin + stages.text_encode
        self._until(deadline)
        stage("text_encode")

        boundary = mark
        for i in range(steps):
            keep = [j for j in alive if not is_cancelled(requests[j].request_id)]
            if len(keep) < len(alive):
                alive = keep
                if not alive:
                    break
                stages = self.latency.stages(work, len(alive))
            deadline += stages.denoise / steps
            self._until(deadline)
            if on_progress is not None:
                on_progress(StepEvent(tuple(requests[j].request_id for j in alive), i + 1, steps, pass_name))
            now = self.clock()
            timings.denoise_step_s.append(now - boundary)
            boundary = now
        stage("denoise", boundary, steps=len(timings.denoise_step_s))

        images: dict[int, Image.Image] = {}
        pngs: dict[int, bytes] = {}
        if alive:
            for j in alive:
                r = requests[j]
                images[j] = placeholder_image(r.prompt, r.seed, r.size.width, r.size.height)
            deadline += stages.decode
            self._until(deadline)
            stage("decode")
            if encode:  # else the serving replica encodes after releasing the engine
                for j in alive:
                    text = {**PNG_TEXT, **(requests[j].png_text or {})}
                    pngs[j] = encode_png(images[j], self.png_compress_level, text=text)
                deadline += stages.png_encode
                self._until(deadline)
                stage("png_encode")
        return [
            GenerationResult(
                request_id=r.request_id,
                seed=r.seed,
                size=r.size,
                image=images.get(j),
                png=pngs.get(j),
                passes=[timings],
                cancelled=j not in images,
            )
            for j, r in enumerate(requests)
        ]


class SimulatedEngine(BatchEngine):
    """A variant on one pool, simulated (benchmarks only). Built by
    :func:`~zimage_platform.engines.engine.create_engine` when ``engine.backend`` is ``simulated``."""

    def __init__(self, config: PlatformConfig, variant: str, pool: str) -> None:
        super().__init__(config, variant, SIMULATED)
        self.pool = pool
        self.latency: SimulatedLatency | None = None
        self.pipeline: SimulatedPipeline | None = None

    def load(self) -> None:
        if not self.config.engine.simulated.acknowledge_not_real:
            raise EngineError(
                "the simulated engine is for benchmarks only: set engine.simulated.acknowledge_not_real: true",
                code="simulated_not_acknowledged",
                param="engine.simulated.acknowledge_not_real",
            )
        self.latency = SimulatedLatency(self.config, self.pool, self.variant)
        self.pipeline = SimulatedPipeline(self.latency, png_compress_level=self.config.engine.png_compress_level)
        self.loaded_at = time.time()
        about = self.latency.describe()
        log.warning(
            "SIMULATED ENGINE (benchmarks only): %s on pool %s loads no model and returns placeholder images; "
            "each batch sleeps the latency model's time (%s, %s model, slice %s, precision %s)",
            self.variant,
            self.pool,
            about["latency"],
            about["kind"],
            about["slice"] or "n/a",
            about["precision"] or "n/a",
        )

    def describe(self) -> dict[str, Any]:
        """What this engine is (``backend: simulated``, ``not_real: true``) and what it emulates."""
        if self.latency is None:
            return {"backend": SIMULATED, "not_real": True, "loaded": False}
        return {**self.latency.describe(), "variant": self.variant, "loaded": True}

    def memory(self) -> MemoryReport:
        return MemoryReport(
            rss_bytes=psutil.Process().memory_info().rss,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            gpu_allocated_bytes=0,
            gpu_peak_bytes=0,
            prompt_cache_bytes=0,
        )
