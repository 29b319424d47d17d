"""Load profiles (``ops/profiles/*.yaml``): who sends what, when, and what they expect back.

A profile is a set of streams. Each stream is one tenant's traffic of one kind (variant, size,
steps, guidance, images per request): a steady Poisson rate, promotional bursts (windows with
their own rate), and bulk submissions (N jobs at one instant, admitted as a whole like a CSV
batch). A stream names a tenant from the platform's tenant folders (``tenants/*.yaml``) for its
priority class and limits, or gives them inline. SLOs are per-class p95 latencies (request to
last image), what ``plan --search`` sizes the pools for.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig
    from zimage_platform.tenancy.models import TenantSpec

PriorityClass = Literal["realtime", "standard", "bulk"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Burst(_Strict):
    """A window ``[start_s, end_s)`` where the stream's rate is ``rate_per_s`` instead of its steady one."""

    start_s: float = Field(ge=0)
    end_s: float = Field(gt=0)
    rate_per_s: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> Burst:
        if self.end_s <= self.start_s:
            raise ValueError("a burst must end after it starts")
        return self


class Submission(_Strict):
    """A bulk submission: ``jobs`` jobs at ``at_s``, admitted (or refused) as one."""

    at_s: float = Field(ge=0)
    jobs: int = Field(ge=1)


class Stream(_Strict):
    name: str
    #: A tenant id from the config's tenant folders (class and limits), or inline values below.
    tenant: str
    priority_class: PriorityClass | None = None
    concurrent_jobs: int | None = Field(None, ge=1)
    monthly_images: int | None = Field(None, ge=0)
    #: Images this tenant already used this month before the simulated window starts.
    used_this_month: int = Field(0, ge=0)
    variant: str = "turbo"
    size: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    #: Images per request: a number, or ``{n: weight}``.
    images_per_request: int | dict[int, float] = 1
    rate_per_s: float = Field(0.0, ge=0)
    bursts: list[Burst] = Field(default_factory=list)
    submissions: list[Submission] = Field(default_factory=list)
    #: Recorded arrival times (seconds from the start) to replay instead of a Poisson process.
    times: list[float] = Field(default_factory=list)

    @field_validator("images_per_request")
    @classmethod
    def _positive(cls, value: int | dict[int, float]) -> int | dict[int, float]:
        counts = [value] if isinstance(value, int) else list(value)
        if not counts or min(counts) < 1:
            raise ValueError("images per request must be at least 1")
        if isinstance(value, dict) and (min(value.values()) < 0 or sum(value.values()) <= 0):
            raise ValueError("image-count weights must be non-negative and not all zero")
        return value

    def rate_at(self, t: float) -> tuple[float, float]:
        """``(rate, until)``: the arrival rate at ``t`` and when it next changes (``inf``: never)."""
        rate, until = self.rate_per_s, float("inf")
        for burst in self.bursts:
            if burst.start_s <= t < burst.end_s:
                return burst.rate_per_s, burst.end_s
            if burst.start_s > t:
                until = min(until, burst.start_s)
        return rate, until

    def arrivals(self, rng: random.Random, horizon_s: float) -> Iterator[float]:
        """Poisson arrival times in ``[0, horizon_s)``, piecewise-constant rate (exact: memoryless);
        or the recorded ``times``."""
        if self.times:
            yield from (t for t in sorted(self.times) if 0 <= t < horizon_s)
            return
        t = 0.0
        while t < horizon_s:
            rate, until = self.rate_at(t)
            if rate <= 0:
                t = until
                continue
            nxt = t + rng.expovariate(rate)
            if nxt >= until:
                t = until
                continue
            t = nxt
            if t < horizon_s:
                yield t

    def draws(self, seed: int) -> tuple[Iterator[float], Iterator[int]]:
        """Its arrival times and image counts as a profile with ``seed`` draws them: the same for
        the simulator and for a benchmark replaying the profile against a live platform."""
        return (
            self.arrivals(random.Random(f"{seed}:{self.name}"), float("inf")),
            self.image_counts(random.Random(f"{seed}:{self.name}:n")),
        )

    def image_counts(self, rng: random.Random) -> Iterator[int]:
        if isinstance(self.images_per_request, int):
            while True:
                yield self.images_per_request
        counts, weights = list(self.images_per_request), list(self.images_per_request.values())
        while True:
            yield rng.choices(counts, weights)[0]

    def mean_images(self) -> float:
        if isinstance(self.images_per_request, int):
            return float(self.images_per_request)
        total = sum(self.images_per_request.values())
        return sum(n * w for n, w in self.images_per_request.items()) / total

    def expected_requests(self, horizon_s: float) -> float:
        """Mean number of requests in ``[0, horizon_s)`` (steady + bursts + submissions)."""
        edges = sorted({0.0, horizon_s, *(b.start_s for b in self.bursts), *(b.end_s for b in self.bursts)})
        total = 0.0
        for a, b in itertools.pairwise(edges):
            if a >= horizon_s:
                break
            total += self.rate_at(a)[0] * (min(b, horizon_s) - a)
        replayed = sum(1 for t in self.times if 0 <= t < horizon_s)
        return replayed + total + sum(s.jobs for s in self.submissions if s.at_s < horizon_s)


@dataclass(frozen=True)
class Arrival:
    """One request (``jobs == 1``) or bulk submission of a stream, at ``at_s`` seconds."""

    at_s: float
    #: Index of the stream in the profile.
    stream: int
    jobs: int
    #: Images per job.
    images: int
    #: A bulk submission: ``jobs`` jobs admitted as one.
    submission: bool = False


class Slo(_Strict):
    """The p95 latency (seconds, request to last image) a class must meet."""

    p95_s: float = Field(gt=0)


class LoadProfile(_Strict):
    name: str
    description: str = ""
    #: Arrivals happen in ``[0, duration_s)``; the simulation then drains what was admitted.
    duration_s: float = Field(gt=0)
    #: How long after ``duration_s`` admitted work may still finish (the rest is "unfinished").
    max_drain_s: float = Field(3600.0, ge=0)
    seed: int = 0
    #: Simulated wall-clock start (monthly quotas are per calendar month).
    start: datetime = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    #: Price of one whole-GPU hour, for the cost column.
    gpu_hour_usd: float = Field(2.5, ge=0)
    #: Seconds a new replica needs before it serves, per pool (``default`` for the rest).
    startup_s: dict[str, float] = Field(default_factory=lambda: {"default": 90.0})
    #: Fixed replicas per deployment (``pool`` or ``pool/variant``); autoscaling still applies
    #: to deployments not named (their config's min/max/initial).
    replicas: dict[str, int] = Field(default_factory=dict)
    slo: dict[PriorityClass, Slo] = Field(default_factory=dict)
    streams: list[Stream] = Field(min_length=1)

    @field_validator("start")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @model_validator(mode="after")
    def _unique_names(self) -> LoadProfile:
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ValueError("stream names must be unique")
        return self

    def startup_for(self, pool: str) -> float:
        return self.startup_s.get(pool, self.startup_s.get("default", 90.0))

    def schedule(self) -> list[Arrival]:
        """Every request and bulk submission in ``[0, duration_s)``, in time order, with the
        arrival times and image counts the simulator draws (for replaying the profile against a
        live platform; the simulator draws the same lazily)."""
        out: list[Arrival] = []
        for index, stream in enumerate(self.streams):
            times, counts = stream.draws(self.seed)
            events = [(t, 1, False) for t in itertools.takewhile(lambda t: t < self.duration_s, times)]
            events += [(s.at_s, s.jobs, True) for s in stream.submissions if s.at_s < self.duration_s]
            # One image count per request and per submission, drawn in time order as the simulator does.
            out += [Arrival(at, index, jobs, next(counts), bulk) for at, jobs, bulk in sorted(events)]
        return sorted(out, key=lambda a: (a.at_s, a.stream))


def load_profile(path: str | Path) -> LoadProfile:
    data = yaml.safe_load(Path(path).read_text()) or {}
    try:
        return LoadProfile.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


class ResolvedStream:
    """A stream with everything filled in from the config and the tenant definitions."""

    def __init__(self, stream: Stream, config: PlatformConfig, tenant: TenantSpec | None) -> None:
        spec = config.variant(stream.variant)
        if tenant is None and stream.priority_class is None:
            raise ValueError(f"stream {stream.name!r}: tenant {stream.tenant!r} is not defined; give priority_class")
        self.stream = stream
        self.name = stream.name
        self.tenant_id = stream.tenant
        self.priority: str = stream.priority_class or (tenant.priority_class if tenant else "standard")
        limits = tenant.limits if tenant else None
        self.concurrent_jobs = stream.concurrent_jobs or (limits.concurrent_jobs if limits else None)
        self.monthly_images = (
            stream.monthly_images if stream.monthly_images is not None else (limits.monthly_images if limits else None)
        )
        self.requests_per_minute = limits.requests_per_minute if limits else None
        self.images_per_minute = limits.images_per_minute if limits else None
        self.variant = stream.variant
        self.size = str(config.buckets_for(stream.variant).resolve(stream.size or spec.defaults.size, param="size"))
        self.steps = stream.steps or spec.defaults.steps
        self.guidance = spec.defaults.guidance if stream.guidance is None else stream.guidance
        self.sampler = spec.defaults.sampler
        self.shift = spec.defaults.shift


def resolve_streams(profile: LoadProfile, config: PlatformConfig) -> list[ResolvedStream]:
    """Fill each stream from its tenant file (if the tenant is defined) and the variant's defaults."""
    from zimage_platform.tenancy.registry import TenantRegistry

    registry = TenantRegistry(config.tenant_dirs, pepper=b"", reload_s=3600.0)
    return [ResolvedStream(s, config, registry.get(s.tenant)) for s in profile.streams]
