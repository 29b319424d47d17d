"""Queue-aware replica autoscaling: one policy for Ray Serve and for the capacity simulator.

Serve's default policy counts the requests its replicas and handles hold. The platform's
scheduler keeps its queue to itself and never sends an engine more batches than it has slots,
so Serve would see at most the in-flight batches and never scale up on a backlog. The engine
deployments therefore run :class:`QueueAwarePolicy` (Serve's custom autoscaling policy, Ray 2.60
``AutoscalingPolicy``), fed by custom metrics the engine replicas report from the scheduler's
view (:class:`EngineLoad`): batches in flight plus the batches its queued images would make.

:func:`desired_replicas` is the one decision; Serve's wrapper around the policy adds the
up/down-scale delays and the min/max bounds. :class:`ReplicaAutoscaler` is the simulator's
model of that wrapper (delays, look-back averaging, start-up time) around the same function, so
``zimage-platform plan`` and the running platform scale alike.

Promotions set a floor through the same policy: ``autoscaling.floors`` windows (the promotion
CronJob writes them into the RayService ahead of time) hold a minimum while they are open.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zimage_platform.config import AutoscalingConfig, ReplicaFloor

#: Custom metric names the engine replicas report (``record_autoscaling_stats``).
QUEUED_BATCHES = "queued_batches"
INFLIGHT_BATCHES = "inflight_batches"


@dataclass(frozen=True)
class EngineLoad:
    """An engine deployment's work as the scheduler sees it (per pool and variant)."""

    inflight_batches: int = 0
    #: Batches the queued images would make (each key's images over its max batch, rounded up).
    queued_batches: int = 0
    #: Queued images per priority class (for operators; the decision uses batches).
    queued_images: Mapping[str, int] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return self.inflight_batches + self.queued_batches

    def metrics(self) -> dict[str, float]:
        """What a replica reports to Serve (flat numbers only)."""
        return {
            QUEUED_BATCHES: float(self.queued_batches),
            INFLIGHT_BATCHES: float(self.inflight_batches),
            **{f"queued_images_{cls}": float(n) for cls, n in self.queued_images.items()},
        }


@dataclass(frozen=True)
class Floor:
    """At least ``min_replicas`` from ``start`` until ``end`` (a promotion's pre-scaling)."""

    start: datetime
    end: datetime
    min_replicas: int


def floor_at(floors: Iterable[Floor | ReplicaFloor], at: datetime) -> int:
    """The highest floor open at ``at`` (0: none)."""
    return max((f.min_replicas for f in floors if f.start <= at < f.end), default=0)


def desired_replicas(
    batches: float, *, slots: int, target: float, min_replicas: int, max_replicas: int, floor: int = 0
) -> int:
    """Replicas that keep ``target`` of each replica's ``slots`` busy with ``batches`` of work
    (in flight and queued), within ``[max(min, floor), max]``."""
    wanted = math.ceil(batches / (slots * target) - 1e-9) if batches > 0 else 0
    return min(max_replicas, max(min_replicas, floor, wanted))


class QueueAwarePolicy:
    """Ray Serve custom autoscaling policy of one engine deployment.

    Built once by Serve's controller with ``policy_kwargs`` (JSON: the pool's scaling config and
    slots per replica; see :func:`serve_autoscaling_config`), then called every control-loop tick
    with Serve's ``AutoscalingContext``. Every replica reports the same deployment-wide view, so
    the freshest (largest over the look-back) is taken, not their sum. With no replica to report
    (scaled to zero) the scheduler's wake-up calls wait at the deployment's handle, and Serve's
    own request count starts the first replica.
    """

    def __init__(self, *, slots: int, target: float, floors: list[dict[str, Any]] | None = None) -> None:
        self.slots = slots
        self.target = target
        self.floors = [
            Floor(datetime.fromisoformat(f["start"]), datetime.fromisoformat(f["end"]), int(f["min_replicas"]))
            for f in floors or []
        ]

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reported = ctx.aggregated_metrics or {}
        queued = reported.get(QUEUED_BATCHES) or {}
        inflight = reported.get(INFLIGHT_BATCHES) or {}
        if queued or inflight:
            batches = max(queued.values(), default=0.0) + max(inflight.values(), default=0.0)
        else:
            batches = float(ctx.total_num_requests)
        now = datetime.fromtimestamp(ctx.current_time, UTC) if ctx.current_time else datetime.now(UTC)
        desired = desired_replicas(
            batches,
            slots=self.slots,
            target=self.target,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            floor=floor_at(self.floors, now),
        )
        return desired, {"batches": batches}


def policy_kwargs(config: AutoscalingConfig, slots: int) -> dict[str, Any]:
    return {
        "slots": slots,
        "target": config.target_ongoing_requests,
        "floors": [
            {"start": f.start.isoformat(), "end": f.end.isoformat(), "min_replicas": f.min_replicas}
            for f in config.floors
        ],
    }


def serve_autoscaling_config(config: AutoscalingConfig, slots: int) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` for an engine deployment, with :class:`QueueAwarePolicy`.

    The one translation from the platform's scaling config (the builder deploys it; the
    promotion tool writes it into a RayService's ``serveConfigV2``)."""
    return {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "initial_replicas": config.initial_replicas,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
        "look_back_period_s": config.look_back_s,
        "metrics_interval_s": config.metrics_interval_s,
        "policy": {
            "policy_function": f"{QueueAwarePolicy.__module__}:{QueueAwarePolicy.__name__}",
            "policy_kwargs": policy_kwargs(config, slots),
        },
    }


class ReplicaAutoscaler:
    """The capacity simulator's model of one engine deployment under Serve with
    :class:`QueueAwarePolicy`: the same :func:`desired_replicas` on the work averaged over
    ``look_back_s``; a change up (down) applied once it has been wanted continuously for
    ``upscale_delay_s`` (``downscale_delay_s``), at once from zero; a new replica serves only
    after ``startup_s`` (pod scheduling, engine load and warm-up).

    While no replica serves, none reports the queue: the policy sees only the scheduler's one
    wake-up call waiting at the handle, so a deployment at zero gets one replica (or its floor)
    at once and the rest once that one serves and reports, after the delay (as measured on
    Serve by ``python -m bench autoscale``)."""

    def __init__(
        self,
        config: AutoscalingConfig,
        *,
        slots: int,
        startup_s: float,
        now: float = 0.0,
        initial: int | None = None,
    ) -> None:
        self.config = config
        self.slots = slots
        self.startup_s = startup_s
        start = initial if initial is not None else (config.initial_replicas or config.min_replicas)
        #: Replicas serving now, and the times the starting ones will be ready.
        self.ready = max(config.min_replicas, min(start, config.max_replicas))
        self.starting: deque[float] = deque()
        self._samples: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        #: +1 / -1 while a change up / down is wanted (since ``_since``), 0 when none is.
        self._direction = 0
        self._since = now

    @property
    def total(self) -> int:
        """Replicas holding a slice: serving or starting."""
        return self.ready + len(self.starting)

    def desired(self, batches: float, floor: int = 0) -> int:
        """The policy's decision for ``batches`` of work (Serve's min/max bounds included)."""
        c = self.config
        return desired_replicas(
            batches,
            slots=self.slots,
            target=c.target_ongoing_requests,
            min_replicas=c.min_replicas,
            max_replicas=c.max_replicas,
            floor=floor,
        )

    def observe(self, now: float, batches: float, floor: int = 0) -> int:
        """Record the deployment's work (``batches`` in flight and queued) at ``now``; apply a
        change once its delay has passed. Returns the change in *serving* replicas (negative:
        stop that many now)."""
        if not self.ready:  # nothing reports: the policy sees the wake-up call, not the queue
            batches = min(batches, 1.0)
        self._samples.append((now, batches))
        self._sum += batches
        while self._samples and now - self._samples[0][0] > self.config.look_back_s:
            self._sum -= self._samples.popleft()[1]
        wanted = self.desired(self._sum / len(self._samples), floor)
        current = self.total
        direction = (wanted > current) - (wanted < current)
        if direction != self._direction:
            self._direction, self._since = direction, now
        if not direction:
            return 0
        delay = self.config.upscale_delay_s if direction > 0 else self.config.downscale_delay_s
        # From zero, Serve starts a replica at once: there is nothing to wait for.
        if current > 0 and now - self._since < delay:
            return 0
        self._direction = 0
        if wanted > current:
            self.starting.extend([now + self.startup_s] * (wanted - current))
            return 0
        surplus = current - wanted
        while surplus and self.starting:  # cancel replicas that are still starting first
            self.starting.pop()
            surplus -= 1
        self.ready -= surplus
        return -surplus

    def promote(self, now: float) -> int:
        """Replicas whose start-up finished by ``now`` start serving; returns how many."""
        n = 0
        while self.starting and self.starting[0] <= now:
            self.starting.popleft()
            n += 1
        self.ready += n
        return n

    def next_ready(self) -> float | None:
        return self.starting[0] if self.starting else None
