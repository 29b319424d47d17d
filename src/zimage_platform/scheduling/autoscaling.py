"""Replica autoscaling with its delays, clock-injected: the capacity simulator's model of Ray Serve.

Modelled on Serve's default policy (``autoscaling_config`` of each engine deployment): the
desired count is ``ceil(demand / target_ongoing_requests)`` within ``[min, max]``, with the
demand averaged over ``look_back_s``; a change up (down) is applied only after it has been
wanted continuously for ``upscale_delay_s`` (``downscale_delay_s``); a new replica serves only
after ``startup_s`` (pod scheduling, engine load and warm-up).

What "demand" is, is the caller's choice, and it matters here: Serve counts the requests its
replicas and handles hold. The platform's scheduler keeps its queue to itself and never sends an
engine more batches than it has slots, so Serve sees at most the in-flight batches — it never
scales up on a backlog (``demand="inflight"``, the deployed behaviour). ``demand="queue"`` adds
the backlog (queued images over the batch size): what a queue-aware policy would do.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from zimage_platform.config import AutoscalingConfig

DemandMode = Literal["inflight", "queue"]


class ReplicaAutoscaler:
    def __init__(
        self,
        config: AutoscalingConfig,
        *,
        startup_s: float,
        look_back_s: float = 30.0,
        now: float = 0.0,
        initial: int | None = None,
    ) -> None:
        self.config = config
        self.startup_s = startup_s
        self.look_back_s = look_back_s
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

    def desired(self, demand: float) -> int:
        wanted = math.ceil(demand / self.config.target_ongoing_requests - 1e-9)
        return max(self.config.min_replicas, min(self.config.max_replicas, wanted))

    def observe(self, now: float, demand: float) -> int:
        """Record ``demand`` at ``now``; apply a change once its delay has passed. Returns the
        change in *serving* replicas (negative: stop that many now)."""
        self._samples.append((now, demand))
        self._sum += demand
        while self._samples and now - self._samples[0][0] > self.look_back_s:
            self._sum -= self._samples.popleft()[1]
        wanted = self.desired(self._sum / len(self._samples))
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
