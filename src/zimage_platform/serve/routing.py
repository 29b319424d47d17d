"""Serve's request router for engine deployments: a batch goes to the replica the scheduler chose.

Serve's default router (power of two choices) compares replicas by the requests they hold. An
engine replica holds a batch while its engine runs it and, after the engine is released, while
it stores that batch's images; the scheduler meanwhile starts the next batch. Serve cannot tell
a replica whose engine is free from one whose engine is busy, so it could queue a batch behind a
busy engine while another replica's engine idles. The scheduler can tell (it places every batch
on the replica with the most free engine slots, ``Batch.replica``); this router sends it there.

A new replica's first heartbeat can reach the scheduler a moment before Serve tells the routers
about the replica: a batch placed there waits for it (``NEW_REPLICA_WAIT_S`` at most). Calls that
name no replica (the wake-up call of a deployment scaled to zero), and a batch whose replica has
gone meanwhile, get Serve's usual choice: the less loaded of two random replicas. The module
stays light: Serve pickles the router class by value into every handle's process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Container, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

#: How long a batch waits for the replica it was placed on to appear in the router.
NEW_REPLICA_WAIT_S = 5.0


def placed_replica(args: Sequence[Any]) -> str | None:
    """The replica a call's batch was placed on (its first argument's ``replica``), if any."""
    return getattr(args[0], "replica", None) if args else None


def rank_replicas(
    candidates: Sequence[Any],
    wanted: str | None,
    *,
    seen: Container[str] = (),
    waited_s: float = 0.0,
    rng: random.Random | None = None,
) -> list[list[Any]]:
    """Replicas to try, best first: the placed one alone while it is there; nothing yet (ask
    again) while a placed replica this router has never seen may still be starting; else two at
    random (Serve then takes the one with the shorter queue)."""
    if wanted is not None:
        for replica in candidates:
            if replica.replica_id.unique_id == wanted:
                return [[replica]]
        if wanted not in seen and waited_s < NEW_REPLICA_WAIT_S:
            return []
    if not candidates:
        return []
    return [(rng or random).sample(list(candidates), min(2, len(candidates)))]


class EngineRouter(RequestRouter):
    """The engine deployments' router (``request_router_config`` in ``serve.builder``).

    No FIFO mixin on purpose: a replica chosen for one batch must go to that batch, not to
    whichever request waits longest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Replicas this router has had as candidates (one missing now has gone, not yet to come).
        self.seen: set[str] = set()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        self.seen.update(r.replica_id.unique_id for r in candidate_replicas)
        if pending_request is None:
            return rank_replicas(candidate_replicas, None)
        # No locality tiers here: when nothing is chosen, or the choice is full, back off and ask again.
        pending_request.routing_context.should_backoff = True
        return rank_replicas(
            candidate_replicas,
            placed_replica(pending_request.args),
            seen=self.seen,
            waited_s=time.time() - pending_request.created_at,
        )
