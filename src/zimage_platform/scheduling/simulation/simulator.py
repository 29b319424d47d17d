"""A discrete-event simulation of the platform's scheduler, in simulated time.

It drives the platform's own scheduling code — :class:`~zimage_platform.scheduling.dispatcher.
Dispatcher` (pools, per-pool :class:`~zimage_platform.scheduling.queue.PoolQueue` priority
queues, the batch merger, borrowing, deadlines) built by the same ``pool_policies(config)`` as the
live service, and :class:`~zimage_platform.scheduling.admission.Admission` (queue bounds, tenant
concurrency caps and quotas → 429) — exactly as :class:`SchedulerService` does, minus the
database, S3 and Ray: a decision is ``dispatcher.poll(now)``, a finished batch is
``dispatcher.done(batch)``. Engines are a latency model; replicas come and go through
:class:`~zimage_platform.scheduling.autoscaling.ReplicaAutoscaler` (delays, start-up time).

Events: arrivals (one pending per stream, generated lazily), bulk submissions, batch
completions, scheduler wake-ups (merge waits, deadlines) and autoscaler ticks, in a heap.
"""

from __future__ import annotations

import heapq
import itertools
import time
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from zimage_platform.scheduling.admission import Admission, AdmissionLimit, QueueFull
from zimage_platform.scheduling.autoscaling import ReplicaAutoscaler, floor_at
from zimage_platform.scheduling.dispatcher import Dispatcher, pool_policies
from zimage_platform.scheduling.simulation.profile import LoadProfile, ResolvedStream, resolve_streams
from zimage_platform.scheduling.work import PRIORITY_CLASSES, Batch, WorkItem, WorkKey

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig
    from zimage_platform.scheduling.simulation.latency import LatencyModel

_ARRIVAL, _SUBMIT, _DONE, _WAKE, _TICK = range(5)
_ACTIVE, _DONE_OK, _FAILED = range(3)

Deployment = tuple[str, str]  # (pool, variant)


def percentiles(values: array, qs: tuple[float, ...] = (50, 95, 99)) -> list[float | None]:
    if not len(values):
        return [None] * len(qs)
    import numpy as np

    return [float(v) for v in np.percentile(np.frombuffer(values, dtype=np.float64), qs)]


@dataclass
class ClassStats:
    requests: int = 0
    admitted: int = 0
    completed: int = 0
    timed_out: int = 0
    unfinished: int = 0
    images_admitted: int = 0
    images_done: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    peak_queue: int = 0
    latency: array = field(default_factory=lambda: array("d"))
    queue_wait: array = field(default_factory=lambda: array("d"))

    def summary(self) -> dict[str, Any]:
        p50, p95, p99 = percentiles(self.latency)
        (w95,) = percentiles(self.queue_wait, (95,))
        return {
            "requests": self.requests,
            "admitted": self.admitted,
            "completed": self.completed,
            "timed_out": self.timed_out,
            "unfinished": self.unfinished,
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": sum(self.rejected.values()),
            "images_admitted": self.images_admitted,
            "images_done": self.images_done,
            "latency_s": {"p50": p50, "p95": p95, "p99": p99},
            "queue_wait_p95_s": w95,
            "peak_queue": self.peak_queue,
        }


@dataclass
class DeploymentStats:
    peak_replicas: int = 0
    replica_seconds: float = 0.0
    busy_slot_seconds: float = 0.0
    slot_seconds: float = 0.0
    batches: int = 0
    images: int = 0


class Simulation:
    """One run. ``replicas`` fixes deployments (the profile's, then the caller's); the others autoscale from the
    config (``autoscale=False``: they stay at their initial count)."""

    def __init__(
        self,
        config: PlatformConfig,
        profile: LoadProfile,
        latency: LatencyModel,
        *,
        replicas: Mapping[Deployment, int] | None = None,
        autoscale: bool = True,
        tick_s: float = 1.0,
        streams: list[ResolvedStream] | None = None,
    ) -> None:
        self.config = config
        self.profile = profile
        self.latency = latency.for_config(config)
        self.tick_s = tick_s
        self.streams = streams if streams is not None else resolve_streams(profile, config)
        self.dispatcher = Dispatcher(pool_policies(config), starvation_s=config.scheduler.starvation_s)
        self.admission = Admission(config.pools, self.dispatcher)
        fixed = config.deployment_counts(profile.replicas, "replicas")
        fixed.update(replicas or {})
        self.fixed = fixed
        self.scalers: dict[Deployment, ReplicaAutoscaler] = {}
        for pool, pool_cfg in config.pools.items():
            for variant in config.pool_variants(pool):
                scaling = pool_cfg.autoscaling
                if (pool, variant) in fixed:
                    n = fixed[(pool, variant)]
                    scaling = scaling.model_copy(update={"min_replicas": n, "max_replicas": max(n, 1)})
                    initial = n
                else:
                    initial = scaling.initial_replicas or scaling.min_replicas
                    if not autoscale:
                        scaling = scaling.model_copy(update={"min_replicas": initial, "max_replicas": max(initial, 1)})
                self.scalers[(pool, variant)] = ReplicaAutoscaler(
                    scaling,
                    slots=pool_cfg.max_concurrent_batches,
                    startup_s=profile.startup_for(pool),
                    initial=initial,
                )
        self.slots = {d: config.pools[d[0]].max_concurrent_batches for d in self.scalers}
        self.stats = {c: ClassStats() for c in PRIORITY_CLASSES}
        self.deployments = {d: DeploymentStats() for d in self.scalers}
        self.warnings: list[str] = []

    # -- running ------------------------------------------------------------------------

    def run(self) -> SimulationResult:
        started = time.perf_counter()
        profile, dispatcher = self.profile, self.dispatcher
        heap: list[tuple[float, int, int, Any]] = []
        seq = itertools.count()
        horizon = profile.duration_s
        end = horizon + profile.max_drain_s
        push = heapq.heappush
        # Per job (index = job id): arrival time, images left, class, tenant, state.
        self._arrival = array("d")
        self._left = array("i")
        self._cls: list[str] = []
        self._tenant: list[str] = []
        self._state = bytearray()
        self._running: dict[str, int] = {}
        #: Jobs admitted and not finished, and how many there were when each job arrived.
        self._in_system = 0
        self._load = array("i")
        self._used: dict[str, int] = {}
        self._wake_at: float | None = None
        self._inflight = 0
        self._keys: list[WorkKey] = []
        self._deadline_s: list[float | None] = []
        for s in self.streams:
            self._keys.append(WorkKey(s.variant, s.size, s.steps, s.guidance > 0, s.sampler, s.shift, None, None))
            pool = self.config.pools[self.config.pool_for_class(s.priority)]
            self._deadline_s.append(pool.queue_deadline_s.get(s.priority))
            self._used.setdefault(s.tenant_id, s.stream.used_this_month)
        self._check_rates()
        for d, scaler in self.scalers.items():
            dispatcher.set_capacity(d[0], d[1], scaler.ready * self.slots[d])
        arrivals: list[Iterator[float]] = []
        counts: list[Iterator[int]] = []
        for i, s in enumerate(self.streams):
            times, images = s.stream.draws(profile.seed)
            arrivals.append(itertools.takewhile(lambda t: t < horizon, times))
            counts.append(images)
            first = next(arrivals[i], None)
            if first is not None:
                push(heap, (first, next(seq), _ARRIVAL, i))
            for sub in s.stream.submissions:
                if sub.at_s < horizon:
                    push(heap, (sub.at_s, next(seq), _SUBMIT, (i, sub.jobs)))
        push(heap, (0.0, next(seq), _TICK, None))
        pending_arrivals = len(heap) - 1
        events = 0
        now = 0.0
        last_tick = 0.0
        while heap:
            t, _, kind, data = heapq.heappop(heap)
            if t > end:  # only far deadlines are left, or the drain time is up
                if self._inflight or dispatcher.depth():
                    now = end
                break
            now = t
            events += 1
            if kind == _ARRIVAL:
                self._admit(data, next(counts[data]), now)
                nxt = next(arrivals[data], None)
                if nxt is not None:
                    push(heap, (nxt, next(seq), _ARRIVAL, data))
                else:
                    pending_arrivals -= 1
            elif kind == _DONE:
                self._finish_batch(data, now)
            elif kind == _SUBMIT:
                stream, jobs = data
                self._admit_many(stream, jobs, next(counts[stream]), now)
                pending_arrivals -= 1
            elif kind == _TICK:
                self._account(now - last_tick)
                last_tick = now
                self._autoscale(now)
                if pending_arrivals > 0 or self._inflight or dispatcher.depth():
                    push(heap, (now + self.tick_s, next(seq), _TICK, None))
            elif kind == _WAKE and data != self._wake_at:
                continue  # superseded by an earlier wake-up
            self._dispatch(now, heap, seq)
        self._account(now - last_tick)
        return self._result(now, events, time.perf_counter() - started)

    # -- admission ----------------------------------------------------------------------

    def _admit(self, stream_index: int, images: int, now: float) -> None:
        s = self.streams[stream_index]
        stats = self.stats[s.priority]
        stats.requests += 1
        tenant = s.tenant_id
        try:
            self.admission.admit(
                tenant,
                s.priority,
                jobs=1,
                images=images,
                running=self._running.get(tenant, 0),
                cap=s.concurrent_jobs,
                quota=s.monthly_images,
                used=self._used[tenant],
                now=now,
                today=self.profile.start + timedelta(seconds=now),
            )
        except (QueueFull, AdmissionLimit) as exc:
            stats.rejected[exc.code] = stats.rejected.get(exc.code, 0) + 1
            return
        self.admission.release(tenant, s.priority, jobs=1, images=images)
        self._queue_job(stream_index, images, now)

    def _admit_many(self, stream_index: int, jobs: int, images_per_job: int, now: float) -> None:
        """A bulk file: admitted as a whole, like ``submit_many`` (queue bound and share, quota;
        the simulator counts its jobs, not batch slots, against the concurrency cap, so it is not
        applied here)."""
        s = self.streams[stream_index]
        stats = self.stats[s.priority]
        stats.requests += jobs
        images = jobs * images_per_job
        try:
            self.admission.admit(
                s.tenant_id,
                s.priority,
                jobs=0,
                images=images,
                running=self._running.get(s.tenant_id, 0),
                cap=None,
                quota=s.monthly_images,
                used=self._used[s.tenant_id],
                now=now,
                today=self.profile.start + timedelta(seconds=now),
            )
        except (QueueFull, AdmissionLimit) as exc:
            stats.rejected[exc.code] = stats.rejected.get(exc.code, 0) + jobs
            return
        self.admission.release(s.tenant_id, s.priority, jobs=0, images=images)
        for _ in range(jobs):
            self._queue_job(stream_index, images_per_job, now)

    def _queue_job(self, stream_index: int, images: int, now: float) -> None:
        s = self.streams[stream_index]
        job = len(self._state)
        job_id = str(job)
        self._arrival.append(now)
        self._left.append(images)
        self._cls.append(s.priority)
        self._tenant.append(s.tenant_id)
        self._state.append(_ACTIVE)
        self._load.append(self._in_system)
        self._in_system += 1
        self._running[s.tenant_id] = self._running.get(s.tenant_id, 0) + 1
        self._used[s.tenant_id] += images
        stats = self.stats[s.priority]
        stats.admitted += 1
        stats.images_admitted += images
        deadline_s = self._deadline_s[stream_index]
        deadline = now + deadline_s if deadline_s is not None else None
        key = self._keys[stream_index]
        start = self.profile.start
        submit = self.dispatcher.submit
        for index in range(images):
            submit(
                WorkItem(
                    job_id=job_id,
                    index=index,
                    tenant_id=s.tenant_id,
                    priority=s.priority,
                    key=key,
                    seed=index,
                    prompt="",
                    negative_prompt="",
                    guidance=s.guidance,
                    input_key=None,
                    created_at=start,
                    enqueued_at=now,
                    deadline=deadline,
                )
            )
        pool = self.dispatcher.pool_of(s.priority)
        depth = self.dispatcher.queues[pool].depth(s.priority)
        if depth > stats.peak_queue:
            stats.peak_queue = depth

    # -- dispatching --------------------------------------------------------------------

    def _dispatch(self, now: float, heap: list, seq: Iterator[int]) -> None:
        """What the live dispatch loop does: poll until nothing starts, then sleep until ``wake_at``."""
        poll = self.dispatcher.poll
        while True:
            decision = poll(now)
            if decision.expired:
                self._expire(decision.expired, now)
            batch = decision.batch
            if batch is None:
                break
            n = len(batch.items)
            seconds = self.latency.batch_seconds(batch.pool, batch.key, n)
            stats = self.deployments[(batch.pool, batch.variant)]
            stats.batches += 1
            stats.images += n
            stats.busy_slot_seconds += seconds
            for item in batch.items:
                self.stats[item.priority].queue_wait.append(now - item.enqueued_at)
            self._inflight += 1
            heapq.heappush(heap, (now + seconds, next(seq), _DONE, batch))
        wake = decision.wake_at
        if wake is not None and (self._wake_at is None or self._wake_at <= now or wake < self._wake_at):
            self._wake_at = wake
            heapq.heappush(heap, (wake, next(seq), _WAKE, wake))

    def _finish_batch(self, batch: Batch, now: float) -> None:
        self.dispatcher.done(batch)
        self._inflight -= 1
        state, left, stats_of = self._state, self._left, self.stats
        done = 0
        for item in batch.items:
            job = int(item.job_id)
            if state[job] != _ACTIVE:
                continue  # its job already failed (deadline): the image is computed, not delivered
            done += 1
            stats_of[item.priority].images_done += 1
            left[job] -= 1
            if not left[job]:
                state[job] = _DONE_OK
                stats = self.stats[self._cls[job]]
                stats.completed += 1
                stats.latency.append(now - self._arrival[job] + self.latency.request_overhead(self._load[job]))
                self._running[self._tenant[job]] -= 1
                self._in_system -= 1
        self.admission.drain.record(now, done)

    def _expire(self, items: list[WorkItem], now: float) -> None:
        """Queue deadline passed: the job fails (``queue_timeout``) and its other images leave the queue."""
        for job_id in dict.fromkeys(i.job_id for i in items):
            job = int(job_id)
            if self._state[job] != _ACTIVE:
                continue
            self._state[job] = _FAILED
            self.stats[self._cls[job]].timed_out += 1
            self._running[self._tenant[job]] -= 1
            self._in_system -= 1
            self.dispatcher.remove_job(job_id)

    # -- replicas -----------------------------------------------------------------------

    def _autoscale(self, now: float) -> None:
        """Serve's control loop, simulated: each engine deployment's policy on the scheduler's load."""
        dispatcher = self.dispatcher
        when = self.profile.start + timedelta(seconds=now)
        for (pool, variant), scaler in self.scalers.items():
            scaler.promote(now)
            floor = floor_at(scaler.config.floors, when)
            scaler.observe(now, dispatcher.load(pool, variant).batches, floor)
            dispatcher.set_capacity(pool, variant, scaler.ready * self.slots[(pool, variant)])
            stats = self.deployments[(pool, variant)]
            stats.peak_replicas = max(stats.peak_replicas, scaler.total)

    def _account(self, dt: float) -> None:
        if dt <= 0:
            return
        for d, scaler in self.scalers.items():
            stats = self.deployments[d]
            stats.replica_seconds += scaler.total * dt
            stats.slot_seconds += scaler.ready * self.slots[d] * dt

    def _check_rates(self) -> None:
        """Rate limits act at the ingress, before admission, and are not simulated: say when the
        profile's traffic would exceed them (the excess would be 429 ``rate_limited``)."""
        per_tenant: dict[str, list[ResolvedStream]] = {}
        for s in self.streams:
            per_tenant.setdefault(s.tenant_id, []).append(s)
        for tenant, streams in per_tenant.items():
            peak = sum(max([s.stream.rate_per_s, *(b.rate_per_s for b in s.stream.bursts)]) for s in streams)
            images = sum(
                max([s.stream.rate_per_s, *(b.rate_per_s for b in s.stream.bursts)]) * s.stream.mean_images()
                for s in streams
            )
            rpm, ipm = streams[0].requests_per_minute, streams[0].images_per_minute
            if rpm is not None and peak * 60 > rpm:
                self.warnings.append(
                    f"tenant {tenant}: peak {peak * 60:.0f} requests/min exceeds its limit {rpm}/min "
                    "(rate limits are not simulated; raise the limit for the promotion)"
                )
            if ipm is not None and images * 60 > ipm:
                self.warnings.append(
                    f"tenant {tenant}: peak {images * 60:.0f} images/min exceeds its limit {ipm}/min "
                    "(rate limits are not simulated; raise the limit for the promotion)"
                )

    # -- results ------------------------------------------------------------------------

    def _result(self, now: float, events: int, wall_s: float) -> SimulationResult:
        for job, state in enumerate(self._state):
            if state == _ACTIVE:
                self.stats[self._cls[job]].unfinished += 1
        pools: dict[str, Any] = {}
        total_gpu_h = 0.0
        for (pool, variant), stats in self.deployments.items():
            fraction = self.config.pools[pool].gpu_fraction
            entry = pools.setdefault(
                pool,
                {"mig_profile": self.config.pools[pool].mig_profile, "gpu_fraction": fraction, "deployments": {}},
            )
            gpu_h = stats.replica_seconds * fraction / 3600
            total_gpu_h += gpu_h
            entry["deployments"][variant] = {
                "fixed": (pool, variant) in self.fixed,
                "peak_replicas": stats.peak_replicas,
                "final_replicas": self.scalers[(pool, variant)].total,
                "mean_replicas": stats.replica_seconds / now if now else 0.0,
                "slice_hours": stats.replica_seconds / 3600,
                "gpu_hours": gpu_h,
                "batches": stats.batches,
                "images": stats.images,
                "mean_batch": stats.images / stats.batches if stats.batches else None,
                "utilisation": stats.busy_slot_seconds / stats.slot_seconds if stats.slot_seconds else None,
            }
        for entry in pools.values():
            entry["slice_hours"] = sum(d["slice_hours"] for d in entry["deployments"].values())
            entry["gpu_hours"] = sum(d["gpu_hours"] for d in entry["deployments"].values())
            entry["peak_slices"] = sum(d["peak_replicas"] for d in entry["deployments"].values())
        classes = {c: s.summary() for c, s in self.stats.items() if s.requests}
        slo = {}
        for cls, target in self.profile.slo.items():
            if cls in classes:
                slo[cls] = {"p95_target_s": target.p95_s, **meets(classes[cls], target.p95_s)}
        return SimulationResult(
            profile=self.profile.name,
            simulated_s=now,
            wall_s=wall_s,
            events=events,
            latency_model=self.latency.describe(),
            classes=classes,
            pools=pools,
            gpu_hours=total_gpu_h,
            cost_usd=total_gpu_h * self.profile.gpu_hour_usd,
            slo=slo,
            warnings=self.warnings,
            replicas={f"{p}/{v}": s.total for (p, v), s in self.scalers.items()},
        )


def meets(summary: dict[str, Any], p95_target_s: float) -> dict[str, Any]:
    """A class meets its SLO when its p95 is within target and nothing was refused for a full
    queue (the class's bound, or a tenant's share of it: a backlog either way) nor lost to a
    deadline or the end of the run (concurrency caps and quotas are not capacity)."""
    p95 = summary["latency_s"]["p95"]
    problems = []
    if p95 is None or p95 > p95_target_s:
        problems.append("p95")
    for code in ("queue_full", "tenant_queue_share"):
        if summary["rejected"].get(code):
            problems.append(code)
    if summary["timed_out"]:
        problems.append("timed_out")
    if summary["unfinished"]:
        problems.append("unfinished")
    return {"p95_s": p95, "met": not problems, "problems": problems}


@dataclass
class SimulationResult:
    profile: str
    simulated_s: float
    wall_s: float
    events: int
    latency_model: dict[str, Any]
    classes: dict[str, dict[str, Any]]
    pools: dict[str, dict[str, Any]]
    gpu_hours: float
    cost_usd: float
    slo: dict[str, dict[str, Any]]
    warnings: list[str]
    #: Replicas per deployment at the end (fixed ones: what was asked).
    replicas: dict[str, int]

    @property
    def slo_met(self) -> bool:
        return all(v["met"] for v in self.slo.values())

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def simulate(
    config: PlatformConfig,
    profile: LoadProfile,
    latency: LatencyModel,
    **options: Any,
) -> SimulationResult:
    return Simulation(config, profile, latency, **options).run()
