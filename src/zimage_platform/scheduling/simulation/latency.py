"""Engine latency models: seconds one engine call takes for a batch, per pool, key and batch size.

Two sources:

- :class:`ComputeModel` — GPUs, from first principles (``ops/latency/*.yaml``): a 6.15B-parameter
  single-stream DiT costs ``2·P·T + 4·L·d·T²`` FLOPs per forward over ``T`` tokens (≈ 6e13 at
  1024², 4,096 image + ~128 caption tokens); an image costs ``steps × (2 with CFG)`` forwards plus
  the text encoder (``2·P_te·tokens``, twice with a negative prompt) and the VAE decoder; a slice
  delivers ``peak TFLOP/s × its share of SMs × MFU`` — the achieved TFLOP/s per MIG slice is the
  parameter that matters, and can be given directly. Batching gains little on a GPU at these
  sequence lengths (``batch_gain``).
- :class:`MeasuredLatency` — measured seconds per batch (bench results on the tiny model, or the
  capacity benchmark's own run), a straight line ``a + b·n`` in the batch size per bucket.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field

from zimage_platform.pipeline.buckets import Resolution

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig
    from zimage_platform.scheduling.work import WorkKey


class LatencyModel(Protocol):
    #: Seconds every request spends outside the engine (HTTP, job rows, S3 writes), added to its latency.
    request_overhead_s: float

    def batch_seconds(self, pool: str, key: WorkKey, batch: int) -> float: ...

    def request_overhead(self, in_system: int = 0) -> float:
        """A request's time outside the scheduler (a constant, or a draw from measurements made with
        ``in_system`` requests in the system when it arrived)."""
        ...

    def for_config(self, config: PlatformConfig) -> LatencyModel:
        """The model for another platform config (pools, precisions): what a simulation runs."""
        ...

    def describe(self) -> dict[str, Any]: ...


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DitShape(_Strict):
    params: float = 6.15e9
    layers: int = 30
    hidden: int = 3840
    #: Pixels per image token: VAE /8 then a 2×2 patch.
    pixels_per_token: int = 256
    caption_tokens: int = 128


class ComputeParams(_Strict):
    """Everything the GPU latency table is derived from (see ``ops/latency/h800-mig.yaml``)."""

    gpu: str = "NVIDIA H800 80GB (SXM)"
    dit: DitShape = DitShape()
    text_encoder_params: float = 4.0e9
    text_tokens: int = 128
    vae_decode_flops_per_megapixel: float = 4.0e12
    #: Dense peak TFLOP/s of the whole GPU per precision.
    peak_tflops: dict[str, float] = Field(default_factory=lambda: {"bf16": 989.5, "fp16": 989.5, "fp8": 1979.0})
    sm_total: int = 132
    #: SMs of each MIG profile; ``gpu`` is a whole GPU.
    slice_sms: dict[str, int] = Field(
        default_factory=lambda: {
            "1g.10gb": 16,
            "1g.20gb": 16,
            "2g.20gb": 32,
            "3g.40gb": 60,
            "4g.40gb": 64,
            "7g.80gb": 132,
            "gpu": 132,
        }
    )
    #: Model FLOP utilisation reached per precision (fp8 attention and norms stay in bf16).
    mfu: dict[str, float] = Field(default_factory=lambda: {"bf16": 0.45, "fp16": 0.45, "fp8": 0.35})
    #: Achieved TFLOP/s per profile and precision, when known: wins over peak × SM share × MFU.
    achieved_tflops: dict[str, dict[str, float]] = Field(default_factory=dict)
    #: Throughput of a batch of n relative to n single calls (1.0 = no gain).
    batch_gain: dict[int, float] = Field(default_factory=lambda: {1: 1.0, 2: 1.04, 4: 1.06, 8: 1.08})
    #: Per engine call: launches, synchronisation, scheduler round trip.
    overhead_s_per_batch: float = 0.02
    #: Per image on the host, in the engine call: PNG encode (level 1) and the S3 PUT.
    host_s_per_image: float = 0.06
    request_overhead_s: float = 0.03


class ComputeModel:
    def __init__(self, params: ComputeParams, config: PlatformConfig) -> None:
        self.params = params
        self.config = config
        self.request_overhead_s = params.request_overhead_s
        self._cache: dict[tuple[str, WorkKey, int], float] = {}

    @classmethod
    def from_file(
        cls, path: str | Path, config: PlatformConfig, *, achieved_tflops: dict[str, dict[str, float]] | None = None
    ) -> ComputeModel:
        """The parameter file; ``achieved_tflops`` (profile → precision → TFLOP/s) wins over its values."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.pop("kind", None)
        for profile, by_precision in (achieved_tflops or {}).items():
            data.setdefault("achieved_tflops", {}).setdefault(profile, {}).update(by_precision)
        return cls(ComputeParams.model_validate(data), config)

    # -- the compute model --------------------------------------------------------------

    def for_config(self, config: PlatformConfig) -> ComputeModel:
        return self if config is self.config else ComputeModel(self.params, config)

    def request_overhead(self, in_system: int = 0) -> float:
        return self.request_overhead_s

    def tokens(self, size: str) -> int:
        return Resolution.parse(size).pixels // self.params.dit.pixels_per_token + self.params.dit.caption_tokens

    def forward_flops(self, size: str) -> float:
        dit, t = self.params.dit, self.tokens(size)
        return 2 * dit.params * t + 4 * dit.layers * dit.hidden * t * t

    def image_flops(self, key: WorkKey) -> dict[str, float]:
        passes = 2 if key.cfg else 1
        return {
            "denoise": key.steps * passes * self.forward_flops(key.size),
            "text_encoder": 2 * self.params.text_encoder_params * self.params.text_tokens * passes,
            "vae_decode": self.params.vae_decode_flops_per_megapixel * Resolution.parse(key.size).megapixels,
        }

    def slice_of(self, pool: str) -> str:
        cfg = self.config.pools[pool]
        if cfg.mig_profile:
            return cfg.mig_profile
        if cfg.num_gpus > 0:
            return "gpu"
        raise ValueError(f"pool {pool!r} has no GPU (no MIG profile, num_gpus 0): use a measured latency table")

    def tflops(self, pool: str, variant: str) -> float:
        """Achieved TFLOP/s of one replica of ``pool`` running ``variant``."""
        profile, precision = self.slice_of(pool), self.config.precision_in(pool, variant)
        given = self.params.achieved_tflops.get(profile, {})
        if precision in given:
            return given[precision]
        if profile not in self.params.slice_sms:
            raise ValueError(f"no SM count for MIG profile {profile!r} (add it to slice_sms)")
        if precision not in self.params.peak_tflops:
            raise ValueError(f"no peak TFLOP/s for precision {precision!r}")
        share = self.params.slice_sms[profile] / self.params.sm_total
        return self.params.peak_tflops[precision] * share * self.params.mfu.get(precision, 0.4)

    def gain(self, batch: int) -> float:
        known = sorted(self.params.batch_gain)
        below = max((b for b in known if b <= batch), default=1)
        return self.params.batch_gain.get(below, 1.0)

    def batch_seconds(self, pool: str, key: WorkKey, batch: int) -> float:
        cache_key = (pool, key, batch)
        seconds = self._cache.get(cache_key)
        if seconds is None:
            flops = self.image_flops(key)
            rate = self.tflops(pool, key.variant) * 1e12
            per_image = (
                flops["denoise"] / (rate * self.gain(batch)) + (flops["text_encoder"] + flops["vae_decode"]) / rate
            )
            seconds = self.params.overhead_s_per_batch + batch * (per_image + self.params.host_s_per_image)
            self._cache[cache_key] = seconds
        return seconds

    def describe(self) -> dict[str, Any]:
        return {"kind": "compute", **self.params.model_dump()}


class MeasuredLatency:
    """Measured seconds per batch, per bucket: ``a + b·n`` through the measured batch sizes.

    Measurements at one step count scale linearly to another (the denoiser dominates). With raw
    samples (:meth:`from_samples`) the model also reproduces their spread: each batch takes the
    line's time × a measured ratio (sample ÷ line), and each request a measured time outside the
    scheduler — drawn with a seeded generator, fresh for every simulation (:meth:`for_config`).
    """

    def __init__(
        self,
        points: dict[str, dict[int, float]],
        *,
        steps: int = 8,
        request_overhead_s: float = 0.0,
        source: str = "",
        ratios: list[float] | None = None,
        overheads: dict[int, list[float]] | None = None,
        seed: int = 0,
    ) -> None:
        if not points:
            raise ValueError("a measured latency table needs at least one bucket")
        self.points = points
        self.steps = steps
        self.request_overhead_s = request_overhead_s
        self.source = source
        self.ratios = list(ratios or [])
        #: Outside-time samples by the least number of requests in the system at arrival.
        self.overheads = {k: list(v) for k, v in sorted((overheads or {}).items()) if v}
        self.seed = seed
        self._rng = random.Random(seed)
        self._lines = {size: self._fit(by_batch) for size, by_batch in points.items()}

    @classmethod
    def from_samples(
        cls,
        samples: dict[str, dict[int, list[float]]],
        overheads: dict[int, list[float]],
        *,
        steps: int = 8,
        source: str = "",
    ) -> MeasuredLatency:
        """Mean per batch size for the line; every sample's ratio to the line for the spread;
        outside times by load (``{least requests in the system: samples}``)."""
        points = {size: {n: statistics.fmean(v) for n, v in by.items() if v} for size, by in samples.items()}
        pooled = [x for v in overheads.values() for x in v]
        model = cls(points, steps=steps, request_overhead_s=statistics.fmean(pooled) if pooled else 0.0)
        ratios = []
        for size, by in samples.items():
            a, b = model._lines[size]
            ratios += [s / (a + b * n) for n, values in by.items() for s in values]
        return cls(
            points,
            steps=steps,
            request_overhead_s=model.request_overhead_s,
            source=source,
            ratios=ratios,
            overheads=overheads,
        )

    def for_config(self, config: PlatformConfig) -> MeasuredLatency:
        """A copy with a fresh generator: every simulation draws the same sequence (determinism)."""
        return MeasuredLatency(
            self.points,
            steps=self.steps,
            request_overhead_s=self.request_overhead_s,
            source=self.source,
            ratios=self.ratios,
            overheads=self.overheads,
            seed=self.seed,
        )

    def request_overhead(self, in_system: int = 0) -> float:
        if not self.overheads:
            return self.request_overhead_s
        bin_ = max((k for k in self.overheads if k <= in_system), default=min(self.overheads))
        return self._rng.choice(self.overheads[bin_])

    @staticmethod
    def _fit(by_batch: dict[int, float]) -> tuple[float, float]:
        """Least-squares line through ``(n, seconds)``; one point: all of it per image."""
        if len(by_batch) == 1:
            ((n, s),) = by_batch.items()
            return 0.0, s / n
        xs, ys = list(by_batch), list(by_batch.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        slope = max(slope, 0.0)
        return max(my - slope * mx, 0.0), slope

    def line(self, size: str) -> tuple[float, float]:
        """The measured line of ``size``; a size without a measurement (one outside the buckets)
        takes the measured size nearest in pixels, scaled by the pixel ratio (the denoiser's cost
        grows about linearly with its tokens at these sizes)."""
        line = self._lines.get(size)
        if line is not None:
            return line
        pixels = Resolution.parse(size).pixels
        nearest = min(self._lines, key=lambda s: (abs(Resolution.parse(s).pixels - pixels), s))
        ratio = pixels / Resolution.parse(nearest).pixels
        intercept, slope = self._lines[nearest]
        return intercept * ratio, slope * ratio

    def batch_seconds(self, pool: str, key: WorkKey, batch: int) -> float:
        intercept, slope = self.line(key.size)
        seconds = (intercept + slope * batch) * key.steps / self.steps
        return seconds * self._rng.choice(self.ratios) if self.ratios else seconds

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "measured",
            "source": self.source,
            "steps": self.steps,
            "request_overhead_s": self.request_overhead_s,
            "seconds_per_batch": {s: {str(n): v for n, v in p.items()} for s, p in self.points.items()},
            "spread_samples": len(self.ratios),
            "overhead_samples": {str(k): len(v) for k, v in self.overheads.items()},
        }

    @classmethod
    def from_bench_json(
        cls, path: str | Path, *, backend: str = "onnxruntime", prompt: str = "cold"
    ) -> MeasuredLatency:
        """Medians of ``python -m bench engine --json-out`` samples (one backend, cold or cached prompts)."""
        import statistics

        data = json.loads(Path(path).read_text())
        grouped: dict[str, dict[int, list[float]]] = {}
        for s in data["samples"]:
            if s["contender"] == backend and s["prompt"] == prompt:
                grouped.setdefault(s["size"], {}).setdefault(int(s["batch"]), []).append(float(s["seconds"]))
        if not grouped:
            raise ValueError(f"{path}: no {backend} samples with {prompt} prompts")
        points = {size: {n: statistics.median(v) for n, v in by.items()} for size, by in grouped.items()}
        return cls(points, source=f"{path} ({backend}, {prompt} prompts, medians)")

    @classmethod
    def from_file(cls, path: str | Path) -> MeasuredLatency:
        """A YAML/JSON table: ``{steps, request_overhead_s, seconds_per_batch: {size: {n: s}}}``."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        points = {size: {int(n): float(s) for n, s in by.items()} for size, by in data["seconds_per_batch"].items()}
        return cls(
            points,
            steps=int(data.get("steps", 8)),
            request_overhead_s=float(data.get("request_overhead_s", 0.0)),
            source=str(path),
        )


def load_latency(
    path: str | Path, config: PlatformConfig, *, achieved_tflops: dict[str, dict[str, float]] | None = None
) -> LatencyModel:
    """A compute-model parameter file (``kind: compute``), a measured table (``kind: measured``),
    or the JSON a ``bench engine`` run wrote."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if "samples" in data:
            return MeasuredLatency.from_bench_json(path)
    kind = (yaml.safe_load(path.read_text()) or {}).get("kind", "compute")
    if kind == "measured":
        return MeasuredLatency.from_file(path)
    return ComputeModel.from_file(path, config, achieved_tflops=achieved_tflops)
