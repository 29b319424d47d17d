"""The engine deployments' request router sends a batch to the replica the scheduler placed it
on (no Ray cluster needed: the router's choice and the deployment options are plain data)."""

from __future__ import annotations

import random
from types import SimpleNamespace

from ray.serve.config import RequestRouterConfig

from zimage_platform.config import PoolConfig
from zimage_platform.scheduling.work import Batch, WorkKey
from zimage_platform.serve.builder import engine_options
from zimage_platform.serve.routing import NEW_REPLICA_WAIT_S, EngineRouter, placed_replica, rank_replicas

KEY = WorkKey("turbo", "64x64", 8, False, "euler", 3.0, None, None)


def replica(unique_id: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def test_a_placed_batch_goes_to_its_replica_and_nothing_else():
    replicas = [replica(r) for r in ("a", "b", "c")]
    batch = Batch(id="batch_1", pool="rt", key=KEY, items=[], replica="b")
    assert placed_replica([batch]) == "b"
    assert rank_replicas(replicas, placed_replica([batch])) == [[replicas[1]]]


def test_a_batch_placed_on_a_replica_not_yet_known_here_waits_for_it_a_moment():
    """The replica's first heartbeat reached the scheduler before Serve told this router."""
    replicas = [replica(r) for r in ("a", "b")]
    assert rank_replicas(replicas, "new", seen={"a", "b"}, waited_s=0.2) == []  # ask again
    assert (
        rank_replicas([*replicas, replica("new")], "new", seen={"a", "b"}, waited_s=0.4)[0][0].replica_id.unique_id
        == "new"
    )
    (late,) = rank_replicas(replicas, "new", seen={"a", "b"}, waited_s=NEW_REPLICA_WAIT_S)
    assert len(late) == 2  # never came: Serve's usual choice


def test_unplaced_calls_and_gone_replicas_get_serves_usual_two_choices():
    replicas = [replica(r) for r in ("a", "b", "c")]
    assert placed_replica([]) is None  # the wake-up call of a deployment at zero
    assert placed_replica([Batch(id="x", pool="rt", key=KEY, items=[])]) is None
    for wanted in (None, "gone"):
        (choice,) = rank_replicas(replicas, wanted, seen={"a", "b", "c", "gone"}, rng=random.Random(1))
        assert len(choice) == 2 and all(r in replicas for r in choice) and choice[0] is not choice[1]
    assert rank_replicas([], "a") == []


def test_engine_deployments_use_the_router(config):
    pools = {"rt": PoolConfig(classes=["realtime", "standard", "bulk"], variants=["turbo"])}
    options = engine_options(config.model_copy(update={"pools": pools}), "turbo", "rt")
    router = RequestRouterConfig(**options["request_router_config"])
    assert router.get_request_router_class() is EngineRouter
