"""Serve's request router for engine deployments: a batch goes to the replica the scheduler chose.

Serve's default router (power of two choices) compares replicas by the requests they hold. An
engine replica holds a batch while its engine runs it and, after the engine is released, while
it stores that batch's images; the scheduler meanwhile starts the next batch. Serve cannot tell
a replica whose engine is free from one whose engine is busy, so it could queue a batch behind a
busy engine while another replica's engine idles. The scheduler can tell (it places every batch
on the replica with the most free engine slots, ``Batch.replica``); this router sends it there.

Calls that name no replica (the wake-up call of a deployment scaled to zero), and a batch whose
replica has gone meanwhile, get Serve's usual choice: the less loaded of two random replicas.
The module stays light: Serve pickles the router class by value into every handle's process.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def placed_replica(args: Sequence[Any]) -> str | None:
    """The replica a call's batch was placed on (its first argument's ``replica``), if any."""
    return getattr(args[0], "replica", None) if args else None


def rank_replicas(candidates: Sequence[Any], wanted: str | None, rng: random.Random | None = None) -> list[list[Any]]:
    """Replicas to try, best first: the placed one alone while it is there, else two at random
    (Serve then takes the one with the shorter queue)."""
    if wanted is not None:
        for replica in candidates:
            if replica.replica_id.unique_id == wanted:
                return [[replica]]
    if not candidates:
        return []
    return [(rng or random).sample(list(candidates), min(2, len(candidates)))]


class EngineRouter(RequestRouter):
    """The engine deployments' router (``request_router_config`` in ``serve.builder``).

    No FIFO mixin on purpose: a replica chosen for one batch must go to that batch, not to
    whichever request waits longest."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return rank_replicas(candidate_replicas, None)
        # No locality tiers here: if the chosen replica is full, back off before asking again.
        pending_request.routing_context.should_backoff = True
        return rank_replicas(candidate_replicas, placed_replica(pending_request.args))
