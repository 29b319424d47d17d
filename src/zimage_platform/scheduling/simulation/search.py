"""The fewest replicas per engine deployment that meet a profile's per-class p95 SLOs.

Borrowing only goes downwards (an idle realtime slice may serve standard work, never the
reverse), but a borrowed batch occupies its slice until it finishes (no preemption), so a pool
that is too small also slows the classes above it. Deployments are therefore sized in rank
order — realtime's pool first — each by a binary search on its replica count with the pools
below held at a generous upper bound, every class checked at every step. A class "meets" its
SLO when its p95 is within target and nothing admitted was lost (no ``queue_full``, no deadline
expiry, nothing unfinished); a class without an SLO must lose nothing. Deployments no stream's
class is routed to get 0 replicas.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zimage_platform.scheduling.dispatcher import pool_policies
from zimage_platform.scheduling.simulation.profile import LoadProfile, resolve_streams
from zimage_platform.scheduling.simulation.simulator import Deployment, Simulation, SimulationResult, meets
from zimage_platform.scheduling.work import PRIORITY_CLASSES, WorkKey

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig
    from zimage_platform.scheduling.simulation.latency import LatencyModel


@dataclass
class SearchResult:
    replicas: dict[str, int]
    result: SimulationResult
    feasible: bool
    runs: int
    wall_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "feasible": self.feasible,
            "runs": self.runs,
            "wall_s": self.wall_s,
            "notes": self.notes,
            "result": self.result.to_dict(),
        }


def search_replicas(
    config: PlatformConfig,
    profile: LoadProfile,
    latency: LatencyModel,
    *,
    max_replicas: int = 8192,
) -> SearchResult:
    started = time.perf_counter()
    streams = resolve_streams(profile, config)
    rank = {name: min(PRIORITY_CLASSES.index(c) for c in pool.classes) for name, pool in config.pools.items()}
    policies = {p.name: p for p in pool_policies(config)}
    # Work (engine-seconds) routed to each deployment, from the profile's expected traffic.
    work: dict[Deployment, float] = {}
    for s in streams:
        pool = config.pool_for_class(s.priority)
        key = WorkKey(s.variant, s.size, s.steps, s.guidance > 0, s.sampler, s.shift, None, None)
        batch = policies[pool].max_batch(key)
        images = s.stream.expected_requests(profile.duration_s) * s.stream.mean_images()
        work[(pool, s.variant)] = (
            work.get((pool, s.variant), 0.0) + images * latency.batch_seconds(pool, key, batch) / batch
        )
    sized = sorted(work, key=lambda d: (rank[d[0]], d[1]))
    assign: dict[Deployment, int] = {
        (pool, variant): 0 for pool in config.pools for variant in config.pool_variants(pool)
    }
    for d in sized:
        assign[d] = min(max_replicas, max(1, math.ceil(2 * work[d] / profile.duration_s) + 1))
    runs = 0

    def run(replicas: dict[Deployment, int]) -> SimulationResult:
        nonlocal runs
        runs += 1
        return Simulation(config, profile, latency, replicas=replicas, autoscale=False, streams=streams).run()

    def ok(result: SimulationResult, pool: str | None = None) -> bool:
        """Every class meets its SLO (``pool``: only the classes that pool serves)."""
        classes = config.pools[pool].classes if pool else list(result.classes)
        for cls in classes:
            summary = result.classes.get(cls)
            if summary is None:
                continue
            target = profile.slo[cls].p95_s if cls in profile.slo else math.inf
            if not meets(summary, target)["met"]:
                return False
        return True

    notes: list[str] = []
    result = run(assign)
    # Make the upper bound feasible: double the pools that miss, as far as max_replicas allows.
    feasible = True
    for pool in sorted({d[0] for d in sized}, key=rank.__getitem__):
        while not ok(result, pool):
            grow = [d for d in sized if d[0] == pool and assign[d] < max_replicas]
            if not grow:
                feasible = False
                notes.append(f"pool {pool}: SLOs not met even at {max_replicas} replicas per deployment")
                break
            for d in grow:
                assign[d] = min(max_replicas, assign[d] * 2)
            result = run(assign)
    if feasible:
        for d in sized:
            lo, hi = 0, assign[d]  # hi meets the pool's SLOs
            while lo < hi:
                mid = (lo + hi) // 2
                if ok(run({**assign, d: mid})):
                    hi = mid
                else:
                    lo = mid + 1
            assign[d] = hi
        result = run(assign)
        if not result.slo_met:
            notes.append("the final assignment misses an SLO: latency is not monotonic in replicas here")
    return SearchResult(
        replicas={f"{p}/{v}": n for (p, v), n in assign.items()},
        result=result,
        feasible=feasible and result.slo_met,
        runs=runs,
        wall_s=time.perf_counter() - started,
        notes=notes,
    )
