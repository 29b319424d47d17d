"""The queue-aware autoscaling policy: one decision for Serve's controller and the simulator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingContext

from zimage_platform.config import AutoscalingConfig
from zimage_platform.scheduling.autoscaling import (
    INFLIGHT_BATCHES,
    QUEUED_BATCHES,
    QueueAwarePolicy,
    desired_replicas,
    serve_autoscaling_config,
)
from zimage_platform.scheduling.dispatcher import Dispatcher, PoolPolicy
from zimage_platform.scheduling.work import WorkItem, WorkKey

NOW = datetime(2026, 11, 11, 0, 30, tzinfo=UTC)


def context(metrics: dict[str, dict[str, float]], *, replicas: int, requests: float = 0.0, lo=1, hi=8):
    """Serve's own context object, as its controller builds it each tick."""
    ids = {
        r: ReplicaID(unique_id=r, deployment_id=DeploymentID("Engine-turbo-rt", "app"))
        for m in metrics.values()
        for r in m
    }
    return AutoscalingContext(
        deployment_id=DeploymentID("Engine-turbo-rt", "app"),
        deployment_name="Engine-turbo-rt",
        app_name="app",
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=list(ids.values()),
        total_num_requests=requests,
        total_queued_requests=0.0,
        aggregated_metrics={name: {ids[r]: v for r, v in values.items()} for name, values in metrics.items()},
        raw_metrics=None,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=NOW.timestamp(),
        config=None,
    )


def test_replicas_follow_queued_and_inflight_batches():
    assert desired_replicas(0, slots=1, target=1.0, min_replicas=1, max_replicas=8) == 1
    assert desired_replicas(5, slots=1, target=1.0, min_replicas=1, max_replicas=8) == 5
    assert desired_replicas(5, slots=2, target=1.0, min_replicas=1, max_replicas=8) == 3
    assert desired_replicas(50, slots=1, target=1.0, min_replicas=1, max_replicas=8) == 8
    assert desired_replicas(0, slots=1, target=1.0, min_replicas=0, max_replicas=8) == 0
    assert desired_replicas(1, slots=1, target=1.0, min_replicas=0, max_replicas=8, floor=4) == 4


def test_the_serve_policy_reads_what_every_replica_reports_once_not_summed():
    policy = QueueAwarePolicy(slots=1, target=1.0)
    # Both replicas relay the scheduler's deployment-wide view: 6 queued + 2 in flight = 8 batches.
    seen = {QUEUED_BATCHES: {"a": 6.0, "b": 5.5}, INFLIGHT_BATCHES: {"a": 2.0, "b": 2.0}}
    assert policy(context(seen, replicas=2))[0] == 8
    assert policy(context(seen, replicas=2, hi=3))[0] == 3


def test_scaled_to_zero_it_starts_a_replica_for_work_waiting_at_the_handle():
    policy = QueueAwarePolicy(slots=1, target=1.0)
    assert policy(context({}, replicas=0, requests=0, lo=0))[0] == 0
    assert policy(context({}, replicas=0, requests=1, lo=0))[0] == 1  # the scheduler's wake-up call


def test_a_promotion_floor_holds_replicas_only_inside_its_window():
    window = {"start": (NOW - timedelta(minutes=5)).isoformat(), "end": (NOW + timedelta(hours=1)).isoformat()}
    policy = QueueAwarePolicy(slots=1, target=1.0, floors=[{**window, "min_replicas": 6}])
    idle = {QUEUED_BATCHES: {"a": 0.0}, INFLIGHT_BATCHES: {"a": 0.0}}
    assert policy(context(idle, replicas=1))[0] == 6
    later = QueueAwarePolicy(
        slots=1, target=1.0, floors=[{**window, "start": (NOW + timedelta(minutes=1)).isoformat(), "min_replicas": 6}]
    )
    assert later(context(idle, replicas=1))[0] == 1


def test_serve_config_names_the_policy_and_carries_floors():
    floor = {"start": NOW, "end": NOW + timedelta(hours=2), "min_replicas": 4}
    scaling = AutoscalingConfig(min_replicas=1, max_replicas=12, floors=[floor], metrics_interval_s=1.5)
    serve = serve_autoscaling_config(scaling, slots=2)
    assert serve["policy"]["policy_function"] == "zimage_platform.scheduling.autoscaling:QueueAwarePolicy"
    kwargs = serve["policy"]["policy_kwargs"]
    assert kwargs["slots"] == 2 and kwargs["floors"][0]["min_replicas"] == 4
    assert serve["metrics_interval_s"] == 1.5 and serve["min_replicas"] == 1 and serve["max_replicas"] == 12
    # What the controller would build from it: a ready policy object.
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

    built = ServeAutoscalingConfig(**serve)
    assert isinstance(built.policy.get_policy()(**kwargs), QueueAwarePolicy)


def test_the_dispatcher_reports_the_load_both_callers_scale_on():
    key = WorkKey("turbo", "64x64", 8, False, "euler", 3.0, None, None)
    d = Dispatcher([PoolPolicy("rt", ("realtime", "standard"), ("turbo",), lambda k: 0.0, lambda k: 4)])
    d.set_capacity("rt", "turbo", 1)
    for n in range(10):
        d.submit(
            WorkItem(
                job_id=f"j{n}",
                index=0,
                tenant_id="t",
                priority="standard" if n % 2 else "realtime",
                key=key if n < 9 else key._replace(size="128x128"),
                seed=n,
                prompt="p",
                negative_prompt="",
                guidance=0.0,
                input_key=None,
                created_at=NOW,
            )
        )
    assert d.next_batch(0.0)[0] is not None  # 4 leave; 5 of 64x64 (2 batches) and 1 of 128x128 wait
    load = d.load("rt", "turbo")
    assert (load.inflight_batches, load.queued_batches, load.batches) == (1, 3, 4)
    assert load.queued_images == {"realtime": 1, "standard": 5}
