"""Typed platform configuration: one place for every default.

Sources, strongest first: keyword arguments, environment (``ZIMAGE_`` prefix, ``__`` between
nested keys, e.g. ``ZIMAGE_ENGINE__BACKEND=torch``), the YAML file, then the defaults below.
Variant specs are data (Triton-style: engines are versioned data, not code): the package ships
``turbo``, ``base`` and ``edit`` (:mod:`zimage_platform.defaults`), ``engines/<variant>.yaml``
replaces or adds one, and all are loaded into :class:`VariantSpec` here so every caller sees one
schema.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from decimal import Decimal
from functools import cached_property
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.buckets import SIZE_MULTIPLE, BucketSet, Resolution, SizeRule

#: ``simulated`` is for benchmarks only (``engine.simulated``): no model, placeholder images.
Backend = Literal["torch", "onnxruntime", "tensorrt", "simulated"]
Precision = Literal["fp32", "fp16", "bf16", "fp8"]
#: pipeline.samplers.SAMPLERS and pipeline.schedules.SCHEDULES (tested to agree).
Sampler = Literal["euler", "res_multistep", "dpmpp_2m", "unipc", "ddim"]
Scheduler = Literal[
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"
]
#: ComfyUI's model folders a variant's files are listed under.
ComfyFolder = Literal["checkpoints", "diffusion_models", "text_encoders", "vae"]

#: The official 1024-base presets plus small CPU buckets.
DEFAULT_BUCKETS: list[str] = [
    "1024x1024",
    "1152x896",
    "896x1152",
    "1152x864",
    "864x1152",
    "1248x832",
    "832x1248",
    "1280x720",
    "720x1280",
    "1344x576",
    "576x1344",
    "512x512",
    "256x256",
    "128x128",
    "64x64",
]

CONFIG_ENV = "ZIMAGE_CONFIG"
DEFAULT_CONFIG_FILE = "zimage-platform.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantDefaults(_Strict):
    size: str = "1024x1024"
    steps: int = Field(8, ge=1)
    guidance: float = Field(0.0, ge=0.0)
    shift: float = Field(3.0, gt=0.0)
    sampler: Sampler = "euler"
    scheduler: Scheduler = "simple"
    negative_prompt: str = ""
    #: img2img / edit: how much of the input image is re-noised (1.0 = ignore the input).
    strength: float = Field(0.6, gt=0.0, le=1.0)


class VariantLimits(_Strict):
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(50, ge=1)
    max_guidance: float = Field(20.0, ge=0.0)
    #: Sizes outside the buckets (dynamic shapes): sides multiples of 16 in [min_side, max_side],
    #: at most max_pixels. 32..2048 is what the exported engines' dynamic axes cover.
    min_side: int = Field(64, ge=32, le=2048)
    max_side: int = Field(2048, ge=32, le=2048)
    max_pixels: int = Field(2048 * 2048, ge=32 * 32)

    @model_validator(mode="after")
    def _ordered(self) -> VariantLimits:
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must not exceed max_steps")
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        if self.min_side % SIZE_MULTIPLE or self.max_side % SIZE_MULTIPLE:
            raise ValueError(f"min_side and max_side must be multiples of {SIZE_MULTIPLE}")
        return self

    @property
    def size_rule(self) -> SizeRule:
        return SizeRule(self.min_side, self.max_side, self.max_pixels)


class BatchProfile(_Strict):
    """How many requests one engine call may carry, per bucket (compiled profiles on TensorRT)."""

    max_batch: int = Field(4, ge=1)
    per_bucket: dict[str, int] = Field(default_factory=dict)
    #: Requests per call at sizes outside the buckets (TensorRT's dynamic-shape profile).
    dynamic_max_batch: int = Field(2, ge=1)

    def for_bucket(self, bucket: Resolution) -> int:
        return self.per_bucket.get(str(bucket), self.max_batch)


class VariantSpec(_Strict):
    """One model variant: its checkpoint, numerics, defaults and compiled shapes."""

    name: str
    description: str = ""
    #: A local folder, an ``s3://bucket/prefix``, or ``tiny`` for the project's offline checkpoint.
    checkpoint: str = "tiny"
    #: ``text2img`` (Turbo, Base) or ``img2img`` (Edit on checkpoints without an image encoder).
    mode: Literal["text2img", "img2img"] = "text2img"
    precision: Precision = "fp32"
    defaults: VariantDefaults = VariantDefaults()
    limits: VariantLimits = VariantLimits()
    #: Buckets for this variant; empty means the platform's list.
    buckets: list[str] = Field(default_factory=list)
    batch: BatchProfile = BatchProfile()
    #: Peak GPU memory per precision (GB), measured; pools check their slices fit (an engine
    #: manifest's measured peak, when one exists, wins over this declaration).
    memory_gb: dict[Precision, float] = Field(default_factory=dict)
    #: More ComfyUI file names this variant answers to, per model folder (Comfy-Org's published
    #: bf16/fp8/int8 files), beside ``z_image_<variant>[_text_encoder|_vae].safetensors``.
    comfy_files: dict[ComfyFolder, list[str]] = Field(default_factory=dict)

    def max_batch(self, size: Resolution, buckets: BucketSet) -> int:
        """Requests per engine call at ``size``: its bucket's, or the dynamic-shape profile's."""
        return self.batch.for_bucket(size) if buckets.is_bucket(size) else self.batch.dynamic_max_batch

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> VariantSpec:
        if not self.limits.min_steps <= self.defaults.steps <= self.limits.max_steps:
            raise ValueError(f"default steps {self.defaults.steps} outside the variant's limits")
        if self.buckets and self.defaults.size not in self.buckets:
            raise ValueError(f"default size {self.defaults.size} is not one of the variant's buckets")
        return self


class PathsConfig(_Strict):
    #: Service data, caches and generated files (git-ignored).
    data_dir: Path = Path("var")
    #: Variant specs overriding the packaged ones: ``<variant>.yaml`` replaces the packaged spec of
    #: that name or adds a variant (no folder: the packaged specs alone).
    engines_dir: Path = Path("engines")
    #: Built engines (ONNX, TensorRT plans) with their manifests.
    engine_build_dir: Path = Path("engines/build")

    @property
    def tiny_checkpoint(self) -> Path:
        return self.data_dir / "checkpoints" / "tiny"

    @property
    def checkpoint_cache(self) -> Path:
        """Local copies of checkpoints fetched from S3."""
        return self.data_dir / "checkpoints" / "s3"


class ModelStoreConfig(_Strict):
    """Where ``s3://`` checkpoints and engines are read from (credentials come from the environment)."""

    endpoint_url: str | None = None
    region: str = "us-east-1"


class SimulatedEngineConfig(_Strict):
    """The ``simulated`` engine, for benchmarks only: it loads no model; each batch sleeps the
    time a GPU latency model gives (batch size, bucket, steps, MIG slice, precision) and returns
    a placeholder PNG (a flat colour and a few blocks from the prompt, seed and size). It makes
    GPU-timescale behaviour (merging gain, overhead vs engine time, burst isolation, autoscaling)
    measurable on CPUs without the engines competing for the cores. Never a generation."""

    #: Must be ``true`` for ``engine.backend: simulated``: its images are placeholders.
    acknowledge_not_real: bool = False
    #: The latency model (``zimage_platform.scheduling.simulation.latency.load_latency``): a
    #: compute-model file (``kind: compute``), a measured table (``kind: measured``) or a
    #: ``bench engine`` JSON. Relative to the engine replicas' working directory.
    latency: Path = Path("ops/latency/h800-mig.yaml")
    #: The slice every pool emulates: a MIG profile of the compute model (``3g.40gb``) or
    #: ``gpu``; unset: each pool's ``mig_profile`` (``gpu`` for pools with ``num_gpus``).
    slice: str | None = None
    #: The precision emulated; unset: the pool's (``pools.<name>.precision``, else the variant's).
    precision: Precision | None = None


class EngineConfig(_Strict):
    backend: Backend = "onnxruntime"
    #: Settings of ``backend: simulated`` (benchmarks only).
    simulated: SimulatedEngineConfig = SimulatedEngineConfig()
    #: Intra-op threads for torch and ONNX Runtime (0 = ``OMP_NUM_THREADS`` where set, as torch
    #: does; Ray sets it to a replica's reserved CPUs. Else every core).
    threads: int = Field(0, ge=0)
    #: Bytes of prompt embeddings kept in memory per engine replica.
    prompt_cache_bytes: int = Field(64 * 1024 * 1024, ge=0)
    max_sequence_length: int = Field(512, ge=16, le=1024)
    #: Max absolute pixel difference (0..255) a built engine may show against torch in ``verify``.
    verify_tolerance: float = Field(2.0, gt=0)
    #: zlib level for result PNGs (1: fast; 6: PIL's default, ~15% smaller, ~5x slower).
    png_compress_level: int = Field(1, ge=0, le=9)
    #: Health checks run a 1-step canary generation at most this often (never a GPU tax per probe).
    canary_interval_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _simulated_is_acknowledged(self) -> EngineConfig:
        if self.backend == "simulated" and not self.simulated.acknowledge_not_real:
            raise ValueError(
                "engine.backend 'simulated' is for benchmarks only: it loads no model and returns "
                "placeholder images; set engine.simulated.acknowledge_not_real: true to run it "
                "(real backends: torch, onnxruntime, tensorrt)"
            )
        return self


PriorityClass = Literal["realtime", "standard", "bulk"]


class ReplicaFloor(_Strict):
    """A promotion's pre-scaling: at least ``min_replicas`` while the window is open."""

    start: AwareDatetime
    end: AwareDatetime
    min_replicas: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaFloor:
        if self.end <= self.start:
            raise ValueError(f"floor window ends ({self.end}) before it starts ({self.start})")
        return self


class AutoscalingConfig(_Strict):
    """How one engine deployment scales (Serve's queue-aware custom policy, see
    ``scheduling/autoscaling.py``): on the batches in flight plus those its queue would make."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    #: Share of a replica's batch slots the policy keeps busy (1.0: scale out as soon as work
    #: would wait for a slot).
    target_ongoing_requests: float = Field(1.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    #: The work is averaged over this window before a decision.
    look_back_s: float = Field(30.0, gt=0)
    #: How often each replica reports the scheduler's view of its deployment's work to Serve.
    metrics_interval_s: float = Field(2.0, gt=0)
    #: Promotion pre-scaling windows (``zimage-platform ops promo`` writes them).
    floors: list[ReplicaFloor] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    @property
    def fixed(self) -> bool:
        """A fixed-size deployment (floors cannot raise it past ``max_replicas`` either)."""
        return self.min_replicas == self.max_replicas


class PoolConfig(_Strict):
    """Engine replicas of one kind (a MIG profile on GPUs, CPU slots here) serving priority classes."""

    #: MIG profile of the pool's slices (``3g.40gb``); ``None`` for CPU or whole GPUs.
    mig_profile: str | None = None
    #: Ray custom resources each replica requires (the chart gives worker groups the same names).
    ray_resources: dict[str, float] = Field(default_factory=dict)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    #: Fraction of a whole GPU one replica holds (3g.40gb on an H100/H800 = 3/7): for GPU-seconds.
    gpu_fraction: float = Field(1.0, gt=0, le=1)
    classes: list[PriorityClass] = Field(default_factory=lambda: ["realtime", "standard", "bulk"])
    #: Variants this pool serves (empty: all).
    variants: list[str] = Field(default_factory=list)
    #: Engine precision in this pool (overrides the variant's; must fit the slice).
    precision: Precision | None = None
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    #: Batches one replica runs at once (Serve's ``max_ongoing_requests``).
    max_concurrent_batches: int = Field(1, ge=1)
    #: Caps on the variants' batch profiles in this pool, per bucket (``default`` for the rest):
    #: a small slice holds smaller batches.
    max_batch: dict[str, int] = Field(default_factory=dict)
    #: Caps on batches this pool's engines run for a lower pool's queue (borrowed work), per
    #: bucket (``default`` for the rest): a short loan gives the engine back soon when this
    #: pool's own class arrives (a realtime request waits at most one small bulk batch).
    lend_max_batch: dict[str, int] = Field(default_factory=dict)
    #: How long the merger waits for a batch to fill while the engine already runs one, per bucket
    #: (``default`` for the rest). An idle engine starts at once.
    max_wait_ms: dict[str, float] = Field(default_factory=lambda: {"default": 25.0})
    #: Queue bound and deadline per class (admission control).
    queue_bound: dict[str, int] = Field(default_factory=lambda: {"realtime": 64, "standard": 1024, "bulk": 100_000})
    queue_deadline_s: dict[str, float] = Field(
        default_factory=lambda: {"realtime": 30.0, "standard": 600.0, "bulk": 86_400.0}
    )
    #: The most of a class's queue bound one tenant's waiting images may take, per class
    #: (``default`` for the rest), in (0, 1]: a tenant over its share gets 429
    #: ``tenant_queue_share`` while other tenants of the class are still admitted.
    tenant_share: dict[PriorityClass | Literal["default"], Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: {"default": 0.5}
    )

    def wait_s(self, bucket: str) -> float:
        return self.max_wait_ms.get(bucket, self.max_wait_ms.get("default", 25.0)) / 1000

    def tenant_bound(self, priority: str) -> int | None:
        """Images one tenant may have waiting in ``priority``'s queue (``None``: unbounded)."""
        bound = self.queue_bound.get(priority)
        if bound is None:
            return None
        share = self.tenant_share.get(priority, self.tenant_share.get("default", 1.0))  # type: ignore[call-overload]
        return max(1, int(bound * share))

    def batch_cap(self, bucket: str) -> int | None:
        return self.max_batch.get(bucket, self.max_batch.get("default"))

    def lend_cap(self, bucket: str) -> int | None:
        return self.lend_max_batch.get(bucket, self.lend_max_batch.get("default"))

    @property
    def slice_gb(self) -> float | None:
        """Memory of one slice, from the MIG profile name (``3g.40gb`` → 40)."""
        if not self.mig_profile:
            return None
        match = re.search(r"(\d+(?:\.\d+)?)gb$", self.mig_profile)
        return float(match.group(1)) if match else None


class SchedulerConfig(_Strict):
    #: A job's lease: a running job not renewed for this long goes back to the queue.
    lease_s: float = Field(60.0, gt=0)
    #: How often leases are renewed and expired ones swept.
    sweep_interval_s: float = Field(5.0, gt=0)
    #: Lowest-class work older than this is served before higher classes (anti-starvation).
    starvation_s: float = Field(300.0, gt=0)
    #: Times an engine failure is retried (on another replica) before the job fails.
    max_attempts: int = Field(3, ge=1)
    #: How often a running batch asks whether any member was cancelled.
    cancel_poll_s: float = Field(0.1, gt=0)
    #: A database write the scheduler cannot make (claim, record, finish) is retried with backoff
    #: for this long; then the scheduler lets the jobs go (its lease lapses, the sweep re-queues
    #: them once the database answers, and a re-run adopts images already stored).
    db_retry_s: float = Field(60.0, gt=0)


class StorageConfig(_Strict):
    """Results in S3. Credentials come from the standard AWS environment / credential chain."""

    bucket: str = "zimage-results"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    presign_ttl_s: int = Field(3600, ge=1, le=7 * 24 * 3600)
    #: Run the embedded SeaweedFS (``weed mini``) on loopback (the embedded default).
    embedded: bool = True


class DatabaseConfig(_Strict):
    #: SQLAlchemy URL; default: a SQLite file under ``paths.data_dir``.
    url: str | None = None


class ApiLimits(_Strict):
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024)
    max_prompt_chars: int = Field(8000, ge=1)
    max_images_per_request: int = Field(8, ge=1, le=16)
    max_input_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_input_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    max_batch_rows: int = Field(10_000, ge=1)
    #: Seconds a synchronous ``/v1/images/generations`` call may wait before 504.
    sync_timeout_s: float = Field(300.0, gt=0)
    #: Open event streams (ComfyUI WebSockets and job SSE together) of one tenant on one ingress
    #: replica; over it: SSE 429 / WebSocket close 4429, ``too_many_streams``.
    max_streams_per_tenant: int = Field(32, ge=1)
    #: How often an open stream re-checks its caller (key, tenant, browser session) between
    #: events; the key and tenant are also checked before every event.
    stream_recheck_s: float = Field(15.0, gt=0)
    #: Fetching input images by URL: allow private/loopback hosts (embedded default only).
    allow_private_urls: bool = False
    #: Workflow graphs as stored (a ComfyUI prompt, a saved workflow): compact JSON bytes and
    #: nodes. The largest official template is ~200 nodes.
    max_graph_bytes: int = Field(1024 * 1024, ge=1024)
    max_graph_nodes: int = Field(1000, ge=1)
    #: A ComfyUI prompt's ``extra_data`` as stored: the frontend puts its whole UI workflow in
    #: it (``extra_pnginfo.workflow``; the largest official template is ~200 KB of JSON).
    max_extra_data_bytes: int = Field(1024 * 1024, ge=1024)
    #: ComfyUI listings (``/history``, ``/queue``, ``/api/jobs``): items per page when the caller
    #: names no size, the most per page, and the most graph + extra_data bytes one response holds.
    history_page_items: int = Field(100, ge=1)
    max_page_items: int = Field(500, ge=1)
    max_listing_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)


class WebhookConfig(_Strict):
    #: Deliver to loopback/private addresses (the embedded default and tests only).
    allow_private: bool = False
    #: Platform master secret: each tenant's signing secret is derived from it (HMAC of the tenant
    #: id and its secret generation) unless the tenant names its own; else a file under data_dir.
    signing_secret: str | None = None
    #: Seconds one attempt may take in all (connect, send, the answer's head).
    timeout_s: float = Field(5.0, gt=0)
    #: Deliveries of one tenant in flight at once: a slow receiver only delays its own tenant.
    per_tenant_concurrency: int = Field(4, ge=1)
    #: Retries back off from backoff_s, doubling up to max_backoff_s (±20% jitter) ...
    backoff_s: float = Field(1.0, gt=0)
    max_backoff_s: float = Field(3600.0, gt=0)
    #: ... until the event is this old (from when it was queued or redelivered): then it is a dead
    #: letter, listed at GET /v1/webhooks/deliveries?status=dead_letter for the tenant to redeliver.
    max_age_s: float = Field(86400.0, gt=0)
    #: After a tenant rotates its secret, the previous one still signs (a second signature) this long.
    rotation_overlap_s: float = Field(86400.0, ge=0)
    #: How often the outbox is polled for retries that have come due.
    poll_s: float = Field(1.0, gt=0)


class TenancyConfig(_Strict):
    #: Folders of tenant definitions (``<id>.yaml``); ``<data_dir>/tenants`` is always added.
    dirs: list[Path] = Field(default_factory=lambda: [Path("tenants")])
    #: Secret for API-key HMACs (set in production from a Secret); else a file under data_dir.
    key_pepper: str | None = None
    #: How often replicas look for changed tenant files.
    reload_s: float = Field(2.0, gt=0)
    #: Rate-limit store: ``memory`` (one ingress replica) or ``redis`` (shared by all replicas).
    rate_limit_backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    #: Key prefix in Redis (several platforms or test runs can share one server).
    redis_prefix: str = "zimage"
    #: Connect and read timeout of each rate-limit call to Redis (no retries).
    redis_timeout_s: float = Field(0.25, gt=0)
    #: After Redis failed, how long it is not dialled (requests/min then count on this replica's
    #: share of the limit, images/min answer 503 ``rate_limiter_unavailable``); then it is probed.
    redis_retry_s: float = Field(5.0, gt=0)
    #: A content policy file replacing the one packaged with the platform (bilingual blocked
    #: terms); unset: the packaged policy. Tenants add or disable rules in their own files.
    policy_file: Path | None = None


class PriceConfig(_Strict):
    """Price of one image of a variant: ``per_megapixel`` × output megapixels, at least ``minimum``."""

    per_megapixel: Decimal = Field(ge=0)
    minimum: Decimal = Field(Decimal("0"), ge=0)


class PlanConfig(_Strict):
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    #: Variant name → price (``default`` for variants not listed).
    prices: dict[str, PriceConfig]


def _default_plans() -> dict[str, PlanConfig]:
    standard = {
        "turbo": PriceConfig(per_megapixel=Decimal("0.0030"), minimum=Decimal("0.0005")),
        "base": PriceConfig(per_megapixel=Decimal("0.0090"), minimum=Decimal("0.0015")),
        "edit": PriceConfig(per_megapixel=Decimal("0.0060"), minimum=Decimal("0.0010")),
    }
    return {
        "standard": PlanConfig(prices=standard),
        "enterprise": PlanConfig(
            prices={
                k: PriceConfig(per_megapixel=v.per_megapixel * Decimal("0.8"), minimum=v.minimum)
                for k, v in standard.items()
            }
        ),
        "bulk": PlanConfig(
            prices={
                k: PriceConfig(per_megapixel=v.per_megapixel * Decimal("0.5"), minimum=v.minimum)
                for k, v in standard.items()
            }
        ),
        "demo": PlanConfig(prices={"default": PriceConfig(per_megapixel=Decimal("0"))}),
    }


class BillingConfig(_Strict):
    #: Tenant plan → prices. A tenant whose plan is not listed is billed at ``default_plan``.
    plans: dict[str, PlanConfig] = Field(default_factory=_default_plans)
    default_plan: str = "standard"

    @model_validator(mode="after")
    def _default_exists(self) -> BillingConfig:
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan {self.default_plan!r} is not one of the plans {sorted(self.plans)}")
        return self


class TelemetryConfig(_Strict):
    """Traces (OpenTelemetry) and metrics (Prometheus names; Ray's metrics agent inside Serve)."""

    #: ``none`` still records trace ids (returned to callers, stored with jobs, bills and objects).
    exporter: Literal["none", "console", "otlp-http", "otlp-grpc"] = "none"
    #: OTLP endpoint: ``http://collector:4318`` (HTTP) or ``collector:4317`` (gRPC).
    otlp_endpoint: str | None = None
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    service_name: str = "zimage-platform"
    environment: str = "embedded"
    export_interval_ms: int = Field(1000, ge=10)
    #: Share of new traces recorded and exported (a caller's sampled ``traceparent`` is followed).
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    #: Where the embedded Ray's metrics agent serves Prometheus text (``serve``); 0: a free port.
    metrics_port: int = Field(0, ge=0, le=65535)


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    app_name: str = "zimage"
    route_prefix: str = "/"
    ingress_replicas: int = Field(1, ge=1)
    #: Job submissions one ingress replica lets into the write path (scheduler, job rows) at
    #: once, per priority class; a class not listed has no limit. Serve's proxy is FIFO for
    #: everyone: without this, a bulk flood's submissions fill the scheduler's event loop ahead
    #: of a realtime request. The excess waits here, in memory, costing no CPU.
    submit_concurrency: dict[PriorityClass, PositiveInt] = Field(default_factory=lambda: {"standard": 32, "bulk": 4})
    #: Seconds a stopping replica gets to finish in-flight batches (the rest go back to the queue).
    graceful_shutdown_s: float = Field(120.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(60.0, gt=0)
    #: Public base URL (for links in responses), when behind an ingress.
    public_url: str | None = None


class FrontendConfig(_Strict):
    """The ComfyUI frontend for people (PyPI ``comfyui-frontend-package``), behind a login."""

    #: Serve the frontend at ``/`` (and the login page); off: the API only.
    enabled: bool = True
    #: How long a browser session lasts after login (then the person logs in again).
    session_ttl_s: int = Field(7 * 24 * 3600, ge=60, le=90 * 24 * 3600)
    #: ``Secure`` on the session cookie: ``auto`` when the request came over https (or a proxy
    #: says so in ``X-Forwarded-Proto``), ``always`` behind a TLS-terminating ingress.
    secure_cookie: Literal["auto", "always"] = "auto"
    #: Origins (``https://comfy.example.com``) besides the request's own host that may send
    #: state-changing requests with the session cookie (the CSRF check).
    allowed_origins: list[str] = Field(default_factory=list)
    #: Per tenant: largest user-data file (saved workflows, settings) and all of them together.
    userdata_max_file_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    userdata_max_total_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    userdata_max_files: int = Field(2000, ge=1)


class PlatformConfig(BaseSettings):
    """The whole platform's configuration (later sections: serve, tenancy, storage, billing...)."""

    model_config = SettingsConfigDict(
        env_prefix="ZIMAGE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    paths: PathsConfig = PathsConfig()
    buckets: list[str] = Field(default_factory=lambda: list(DEFAULT_BUCKETS))
    engine: EngineConfig = EngineConfig()
    model_store: ModelStoreConfig = ModelStoreConfig()
    #: Variant specs; unless given inline: the packaged ones with ``paths.engines_dir``'s overrides.
    variants: dict[str, VariantSpec] = Field(default_factory=dict)
    #: Engine pools (one engine deployment per variant × pool). The embedded default: one CPU pool.
    pools: dict[str, PoolConfig] = Field(
        default_factory=lambda: {"cpu": PoolConfig(num_cpus=0.5, max_wait_ms={"default": 20.0})}
    )
    scheduler: SchedulerConfig = SchedulerConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    limits: ApiLimits = ApiLimits()
    webhooks: WebhookConfig = WebhookConfig()
    serve: ServeConfig = ServeConfig()
    frontend: FrontendConfig = FrontendConfig()
    tenancy: TenancyConfig = TenancyConfig()
    billing: BillingConfig = BillingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    @field_validator("buckets")
    @classmethod
    def _valid_buckets(cls, value: list[str]) -> list[str]:
        BucketSet(value)
        return value

    @model_validator(mode="after")
    def _load_variant_specs(self) -> PlatformConfig:
        if not self.variants:
            self.variants = load_variant_specs(self.paths.engines_dir)
        for name, spec in self.variants.items():
            if spec.name != name:
                raise ValueError(f"variant key {name!r} does not match spec name {spec.name!r}")
            unknown = (set(spec.buckets) | {spec.defaults.size}) - set(self.buckets)
            if unknown:
                raise ValueError(f"variant {name!r} names sizes not in the platform's buckets: {sorted(unknown)}")
        owners: dict[str, str] = {}
        for name, spec in self.variants.items():
            for folder, files in spec.comfy_files.items():
                if folder not in ("checkpoints", "diffusion_models"):
                    continue  # text encoders and VAEs may be shared by variants
                for file in files:
                    if owners.setdefault(file, name) != name:
                        raise ValueError(
                            f"comfy_files: model file {file!r} is named by both {owners[file]!r} and {name!r} "
                            "(a diffusion model or checkpoint file selects one variant)"
                        )
        served = [c for pool in self.pools.values() for c in pool.classes]
        for pool_name, pool in self.pools.items():
            missing = set(pool.variants) - set(self.variants)
            if self.variants and missing:
                raise ValueError(f"pool {pool_name!r} serves unknown variants {sorted(missing)}")
        if self.pools and len(set(served)) < len(served):
            raise ValueError("each priority class must be served by exactly one pool (idle pools borrow the rest)")
        self._check_pools_fit()
        return self

    def precision_in(self, pool: str, variant: str) -> Precision:
        return self.pools[pool].precision or self.variant(variant).precision

    def _check_pools_fit(self) -> None:
        """A pool's engines must fit its MIG slice: e.g. BF16 Turbo peaks near 21.7 GB, so it cannot
        run on 1g.20gb slices, FP8 (13.3 GB) can. Measured peaks in engine manifests win."""
        from zimage_platform.engines.manifest import read_manifest

        for pool_name, pool in self.pools.items():
            slice_gb = pool.slice_gb
            if slice_gb is None:
                continue
            for variant in self.pool_variants(pool_name):
                precision = self.precision_in(pool_name, variant)
                peak = None
                for backend in ("tensorrt", "onnxruntime", "torch"):
                    folder = self.paths.engine_build_dir / variant / f"{backend}-{precision}"
                    manifest = read_manifest(folder) if folder.is_dir() else None
                    if manifest is not None and manifest.peak_memory_gb:
                        peak = manifest.peak_memory_gb
                        break
                peak = peak or self.variants[variant].memory_gb.get(precision)
                if peak is not None and peak > slice_gb:
                    fits = [p for p, gb in self.variants[variant].memory_gb.items() if gb <= slice_gb]
                    raise ValueError(
                        f"pool {pool_name!r} ({pool.mig_profile}) cannot hold {variant} at {precision}: "
                        f"it peaks near {peak:g} GB; precisions that fit: {fits or 'none'}"
                    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    # -- derived views ------------------------------------------------------------------

    def variant(self, name: str) -> VariantSpec:
        from zimage_platform.errors import InvalidRequest

        try:
            return self.variants[name]
        except KeyError:
            raise InvalidRequest(
                f"unknown variant {name!r}", code="unknown_variant", param="variant", choices=sorted(self.variants)
            ) from None

    def buckets_for(self, variant: str) -> BucketSet:
        """The variant's buckets and its rule for every other size."""
        spec = self.variant(variant)
        return BucketSet(spec.buckets or self.buckets, spec.limits.size_rule)

    @cached_property
    def all_buckets(self) -> BucketSet:
        return BucketSet(self.buckets)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.paths.data_dir / 'zimage.db').resolve()}"

    @property
    def tenant_dirs(self) -> list[Path]:
        return [*self.tenancy.dirs, self.paths.data_dir / "tenants"]

    @property
    def key_pepper_file(self) -> Path:
        return self.paths.data_dir / "secrets" / "key-pepper"

    def pool_for_class(self, cls: str) -> str:
        for name, pool in self.pools.items():
            if cls in pool.classes:
                return name
        raise ValueError(f"no pool serves priority class {cls!r}")

    def pool_variants(self, pool: str) -> list[str]:
        return self.pools[pool].variants or sorted(self.variants)

    def deployment_counts(
        self, spec: Mapping[str, int], option: str, source: str = "the platform config"
    ) -> dict[tuple[str, str], int]:
        """``{"pool": n}`` (each engine deployment of the pool) or ``{"pool/variant": n}`` as counts
        per (pool, variant), checked against the pools: replicas for ``plan``, minimums for
        ``ops promo``. Errors name the flag (``option``) and where the pools came from (``source``)."""
        counts: dict[tuple[str, str], int] = {}
        for name, n in spec.items():
            pool, _, variant = name.partition("/")
            if pool not in self.pools:
                raise InvalidRequest(
                    f"{option} {name}: unknown pool {pool!r} (there is no pool {pool!r} in {source})",
                    code="unknown_pool",
                    param=option,
                    choices=sorted(self.pools),
                )
            variants = self.pool_variants(pool)
            if variant and variant not in variants:
                raise InvalidRequest(
                    f"{option} {name}: pool {pool!r} does not serve {variant!r}",
                    code="unknown_variant",
                    param=option,
                    choices=variants,
                )
            if n < 0:
                raise InvalidRequest(
                    f"{option} {name}: must be at least 0, not {n}", code="invalid_count", param=option
                )
            for v in [variant] if variant else variants:
                counts[(pool, v)] = n
        return counts


def variant_spec_files(engines_dir: Path | None) -> dict[str, Traversable]:
    """``variant -> spec file``: the packaged specs, each ``<variant>.yaml`` in ``engines_dir``
    replacing the packaged one of its name (or adding a variant). Works from any folder."""
    from zimage_platform.defaults import variant_spec_files as packaged

    files: dict[str, Traversable] = dict(packaged())
    if engines_dir is not None and engines_dir.is_dir():
        files.update({path.stem: path for path in sorted(engines_dir.glob("*.yaml"))})
    return files


def load_variant_specs(engines_dir: Path | None) -> dict[str, VariantSpec]:
    """The variant specs of :func:`variant_spec_files`, validated."""
    specs: dict[str, VariantSpec] = {}
    for name, file in variant_spec_files(engines_dir).items():
        data = yaml.safe_load(file.read_text()) or {}
        data.setdefault("name", name)
        try:
            specs[name] = VariantSpec.model_validate(data)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from exc
    return specs


def find_config_file(explicit: Path | None = None) -> Path | None:
    """``--config``, else ``$ZIMAGE_CONFIG``, else ``./zimage-platform.yaml`` if present."""
    if explicit is not None:
        return explicit
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else None


def load_config(path: str | Path | None = None, **overrides: Any) -> PlatformConfig:
    """Load the config: ``overrides`` beat the environment, which beats the YAML file."""
    file = find_config_file(Path(path) if path is not None else None)
    if file is not None and not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")

    class _Layered(PlatformConfig):
        model_config = SettingsConfigDict(yaml_file=file)

        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_: Any):  # type: ignore[override]
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if file is not None:
                sources += (YamlConfigSettingsSource(settings_cls),)
            return sources

    # Re-validate as the plain class so the result pickles (Ray ships it to replicas).
    return PlatformConfig.model_validate(_Layered(**overrides).model_dump())
