"""Which batch runs where, now: queues per pool, capacity per engine, borrowing downwards.

Capacity is explicit: an engine deployment (variant × pool) may have at most
``replicas × max_concurrent_batches`` batches in flight, and a batch is only formed when one
can start. Batches are therefore bound late, so a request that arrives while the engines are
busy still overtakes lower-priority work that arrived before it.

Borrowing: a pool whose own queue is empty lends its free engines to the queues of pools that
serve lower classes. It never takes work while its own class waits, and a pool's own engines
serve its own queue before anyone else's. A pool may cap the batches it runs on loan
(``lend_max_batch``), so its own class never waits behind a long borrowed batch.

Placement: when the replicas of an engine deployment are known one by one (their heartbeats),
each batch names the replica it goes to: the one with the most free engine slots. Serve's own
router cannot tell a replica whose engine is free (it is only storing its last batch's images)
from one whose engine is busy, and would queue a batch behind a busy engine while another idles.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zimage_platform.scheduling.autoscaling import EngineLoad
from zimage_platform.scheduling.queue import PoolQueue
from zimage_platform.scheduling.work import PRIORITY_CLASSES, Batch, WorkItem, WorkKey

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig


@dataclass(frozen=True)
class PoolPolicy:
    name: str
    classes: tuple[str, ...]
    variants: tuple[str, ...]
    #: Merge wait per key (seconds).
    max_wait: Callable[[WorkKey], float]
    #: Largest batch per key (the engine's compiled profile).
    max_batch: Callable[[WorkKey], int]
    #: Largest batch per key when running a lower pool's work (borrowing); default: ``max_batch``.
    lend_batch: Callable[[WorkKey], int] | None = None

    @property
    def rank(self) -> int:
        return min(PRIORITY_CLASSES.index(c) for c in self.classes)


def pool_policies(config: PlatformConfig) -> list[PoolPolicy]:
    """Each pool's merge waits and batch caps (the engine's profile, capped by the pool), from the config.

    Memoised per key: they are asked for on every dispatch decision.
    """
    from zimage_platform.pipeline.buckets import Resolution

    def policy(name: str) -> PoolPolicy:
        pool = config.pools[name]
        waits: dict[WorkKey, float] = {}
        caps: dict[WorkKey, int] = {}
        lend_caps: dict[WorkKey, int] = {}

        def max_wait(key: WorkKey) -> float:
            if key not in waits:
                waits[key] = pool.wait_s(key.size)
            return waits[key]

        def max_batch(key: WorkKey) -> int:
            if key not in caps:
                engine = config.variant(key.variant).max_batch(
                    Resolution.parse(key.size), config.buckets_for(key.variant)
                )
                cap = pool.batch_cap(key.size)
                caps[key] = min(engine, cap) if cap else engine
            return caps[key]

        def lend_batch(key: WorkKey) -> int:
            if key not in lend_caps:
                cap = pool.lend_cap(key.size)
                lend_caps[key] = min(max_batch(key), cap) if cap else max_batch(key)
            return lend_caps[key]

        return PoolPolicy(
            name=name,
            classes=tuple(pool.classes),
            variants=tuple(config.pool_variants(name)),
            max_wait=max_wait,
            max_batch=max_batch,
            lend_batch=lend_batch if pool.lend_max_batch else None,
        )

    return [policy(name) for name in config.pools]


@dataclass
class Decision:
    """One look at the queues: a batch to start now (or none), items whose deadline passed, and
    when to look again if nothing else happens (``None``: only on an event)."""

    batch: Batch | None
    expired: list[WorkItem] = field(default_factory=list)
    wake_at: float | None = None


class Dispatcher:
    def __init__(self, pools: Iterable[PoolPolicy], *, starvation_s: float | None = None) -> None:
        self.pools = sorted(pools, key=lambda p: p.rank)
        self._policies = {p.name: p for p in self.pools}
        self.queues = {p.name: PoolQueue(starvation_s=starvation_s) for p in self.pools}
        self._pool_of_class = {c: p.name for p in self.pools for c in p.classes}
        self.capacity: dict[tuple[str, str], int] = {}
        self.inflight: dict[tuple[str, str], int] = {}
        #: Live replicas of each engine deployment and their batch slots (when known one by one),
        #: and the engine slots each replica's batches hold.
        self.replicas: dict[tuple[str, str], dict[str, int]] = {}
        self.held: dict[tuple[str, str], dict[str, int]] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)

    # -- queues -------------------------------------------------------------------------

    def pool_of(self, priority: str) -> str:
        return self._pool_of_class[priority]

    def submit(self, item: WorkItem) -> str:
        pool = self._pool_of_class[item.priority]
        self.queues[pool].add(item)
        return pool

    def remove_job(self, job_id: str) -> list[WorkItem]:
        return [i for q in self.queues.values() for i in q.remove_job(job_id)]

    def expire(self, now: float) -> list[WorkItem]:
        return [i for q in self.queues.values() for i in q.expire(now)]

    def earliest_deadline(self) -> float | None:
        deadlines = [d for q in self.queues.values() if (d := q.earliest_deadline()) is not None]
        return min(deadlines) if deadlines else None

    def depth(self, pool: str | None = None) -> int:
        return sum(len(q) for name, q in self.queues.items() if pool in (None, name))

    # -- capacity -----------------------------------------------------------------------

    def set_capacity(self, pool: str, variant: str, batches: int) -> None:
        self.capacity[(pool, variant)] = batches
        self.inflight.setdefault((pool, variant), 0)

    def set_replicas(self, pool: str, variant: str, slots: Mapping[str, int]) -> None:
        """The live replicas of an engine deployment and their batch slots: the capacity is their
        sum, and each batch is placed on one of them (:attr:`Batch.replica`)."""
        self.replicas[(pool, variant)] = dict(slots)
        self.set_capacity(pool, variant, sum(slots.values()))

    def free(self, pool: str, variant: str) -> int:
        return self.capacity.get((pool, variant), 0) - self.inflight.get((pool, variant), 0)

    def done(self, batch: Batch) -> None:
        """The batch's engine slot is free again (its images may still be being stored)."""
        deployment = (batch.pool, batch.variant)
        self.inflight[deployment] -= 1
        held = self.held.get(deployment, {})
        if batch.replica in held:
            held[batch.replica] -= 1
            if not held[batch.replica]:
                del held[batch.replica]

    def _place(self, pool: str, variant: str) -> str | None:
        """The replica with the most free engine slots (``None``: replicas not known one by one,
        or none has a free slot by this count — Serve's router then chooses)."""
        replicas = self.replicas.get((pool, variant))
        if not replicas:
            return None
        held = self.held.setdefault((pool, variant), {})
        replica = max(sorted(replicas), key=lambda r: replicas[r] - held.get(r, 0))
        if replicas[replica] - held.get(replica, 0) <= 0:
            return None
        held[replica] = held.get(replica, 0) + 1
        return replica

    def load(self, pool: str, variant: str) -> EngineLoad:
        """The work of one engine deployment: its batches in flight, and the batches its pool's
        queued images of ``variant`` would make (what its autoscaling policy scales on; the
        live scheduler and the capacity simulator both ask this)."""
        policy = self._policies[pool]
        queue = self.queues[pool]
        queued = sum(math.ceil(n / policy.max_batch(k)) for k, n in queue.key_counts().items() if k.variant == variant)
        return EngineLoad(
            inflight_batches=self.inflight.get((pool, variant), 0),
            queued_batches=queued,
            queued_images={cls: n for cls, n in queue.depths().items() if n},
        )

    # -- decisions ----------------------------------------------------------------------

    def poll(self, now: float) -> Decision:
        """What the scheduler loop (live or simulated) does at ``now``: expire, then pick a batch."""
        expired = self.expire(now)
        batch, wake_at = self.next_batch(now)
        if batch is not None:
            return Decision(batch, expired)
        wakes = [t for t in (wake_at, self.earliest_deadline()) if t is not None]
        return Decision(None, expired, min(wakes) if wakes else None)

    def next_batch(self, now: float) -> tuple[Batch | None, float | None]:
        """The next batch to start, or ``(None, wake_at)`` (``None``: wait for an event).

        Pools without a free engine or without queued work are skipped before any queue is
        looked at: this runs after every arrival and every finished batch.
        """
        wake: list[float] = []
        free = {pool.name: self._free_variants(pool) for pool in self.pools}
        # Pass 1: every pool serves its own queue. Pass 2: idle pools borrow from lower pools.
        for pool in self.pools:
            if not free[pool.name] or not self.queues[pool.name]:
                continue
            batch, at = self._from(pool, pool, now, free[pool.name])
            if batch:
                return batch, None
            if at is not None:
                wake.append(at)
        for i, pool in enumerate(self.pools):
            if not free[pool.name] or self.queues[pool.name]:
                continue
            for lower in self.pools[i + 1 :]:
                if not self.queues[lower.name]:
                    continue
                batch, at = self._from(pool, lower, now, free[pool.name])
                if batch:
                    return batch, None
                if at is not None:
                    wake.append(at)
        return None, min(wake) if wake else None

    def _free_variants(self, pool: PoolPolicy) -> list[str]:
        name, capacity, inflight = pool.name, self.capacity, self.inflight
        return [v for v in pool.variants if capacity.get((name, v), 0) > inflight.get((name, v), 0)]

    def _from(
        self, runner: PoolPolicy, source: PoolPolicy, now: float, free: list[str]
    ) -> tuple[Batch | None, float | None]:
        cap = runner.max_batch if runner is source or runner.lend_batch is None else runner.lend_batch
        inflight, name = self.inflight, runner.name

        def max_wait(key: WorkKey) -> float:
            # An engine with nothing in flight starts at once: waiting could only merge requests
            # that have not arrived yet. While it is busy, work piles up and batches fill anyway.
            return source.max_wait(key) if inflight.get((name, key.variant), 0) else 0.0

        items, wake_at = self.queues[source.name].next_batch(now, max_batch=cap, max_wait=max_wait, variants=free)
        if not items:
            return None, wake_at
        key = items[0].key
        self.inflight[(runner.name, key.variant)] += 1
        batch = Batch(
            id=f"batch_{self._prefix}_{next(self._ids)}",
            pool=runner.name,
            key=key,
            items=items,
            replica=self._place(runner.name, key.variant),
        )
        if runner is not source:
            batch.source_pool = source.name
        return batch, None
