"""``python -m bench autoscale`` without a cluster: the replay schedule is the simulator's, and
the scale-up, latency and verdict logic read polled rows and job times the way the report says."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from bench.autoscale import (
    POOLS,
    PROFILE,
    Sent,
    class_latencies,
    configured_delay,
    p95_targets,
    replay_plan,
    replica_starts,
    scale_up_target,
    scale_ups,
)

from zimage_platform.config import AutoscalingConfig, load_config
from zimage_platform.scheduling.simulation import load_latency, load_profile, simulate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def profile():
    return load_profile(PROFILE)


def test_the_replay_sends_what_the_simulator_simulates(profile):
    config = load_config(POOLS)
    plan = replay_plan(profile, config)
    assert [at for at, _ in plan] == sorted(at for at, _ in plan) and plan[-1][0] < profile.duration_s
    result = simulate(config, profile, load_latency(REPO / "ops" / "latency" / "h800-mig.yaml", config))
    for cls in ("realtime", "standard", "bulk"):
        mine = [s for _, s in plan if s.priority == cls]
        assert sum(s.jobs for s in mine) == result.classes[cls]["requests"]
        assert sum(s.jobs * s.images for s in mine) == result.classes[cls]["images_admitted"]
    assert {s.kind for _, s in plan if s.priority == "bulk"} == {"submission"}
    assert 200 <= len(plan) <= 600  # what 2 cores can drive in a few minutes


def test_a_profile_with_a_variant_the_bench_does_not_serve_is_refused(profile):
    other = profile.model_copy(update={"streams": [profile.streams[0].model_copy(update={"variant": "base"})]})
    with pytest.raises(typer.BadParameter, match="turbo only"):
        replay_plan(other, load_config(POOLS))


def test_replica_starts_pair_starting_and_running_first_in_first_out():
    rows = [  # t, running, starting, batches
        [0.0, 1, 0, 0],
        [1.0, 1, 2, 3],  # two start
        [2.0, 2, 1, 3],  # the first runs
        [3.0, 2, 2, 4],  # another starts
        [4.0, 4, 0, 4],  # both run
        [5.0, 4, 1, 5],  # one starts and is cancelled
        [6.0, 4, 0, 1],
        [7.0, 4, 1, 5],  # still starting at the end
    ]
    assert replica_starts(rows) == [(1.0, 2.0), (1.0, 4.0), (3.0, 4.0), (7.0, None)]
    assert replica_starts([[0.0, 0, 1, 1], [1.0, 1, 0, 1]]) == [(None, 1.0)]  # began before the watch


def test_scale_up_is_timed_from_when_the_work_first_called_for_it():
    scaling = AutoscalingConfig(min_replicas=0, max_replicas=4, upscale_delay_s=5, look_back_s=2, metrics_interval_s=1)
    rows = [
        [0.0, 0, 0, 0],
        [1.0, 0, 0, 2],  # work waits for a deployment at zero
        [2.0, 0, 1, 2],
        [5.0, 1, 0, 2],
        [6.0, 1, 0, 1],  # one replica is enough here ...
        [7.0, 1, 0, 3],  # ... and from here on three are wanted
        [9.0, 1, 0, 3],
        [14.0, 1, 2, 3],
        [20.0, 3, 0, 3],
    ]
    events = scale_ups(rows, scaling, slots=1)
    assert [(e["needed_at"], e["started_at"], e["running_at"], e["from_zero"]) for e in events] == [
        (1.0, 2.0, 5.0, True),
        (7.0, 14.0, 20.0, False),
        (7.0, 14.0, 20.0, False),
    ]
    assert events[1]["decision_s"] == 7.0 and events[1]["startup_s"] == 6.0 and events[1]["scale_up_s"] == 13.0
    # From zero, the queue shows only once a replica serves: the second start is timed from there.
    from_zero = [[0.0, 0, 0, 0], [1.0, 0, 1, 5], [9.0, 0, 1, 5], [10.0, 1, 0, 5], [16.0, 1, 1, 5], [30.0, 2, 0, 5]]
    assert [(e["needed_at"], e["started_at"]) for e in scale_ups(from_zero, scaling, slots=1)] == [
        (1.0, 1.0),
        (10.0, 16.0),
    ]
    assert configured_delay(scaling) == 8.0
    allowed = {"Engine-turbo-rt": 8.5}
    ok = scale_up_target([{"deployment": "Engine-turbo-rt", **e} for e in events], allowed)
    assert ok.verdict == "PASS" and ok.measured == pytest.approx(-1.5)
    late = scale_up_target([{"deployment": "Engine-turbo-rt", "decision_s": 9.0}], allowed)
    assert late.verdict == "FAIL"
    assert scale_up_target([], allowed).verdict == "NOT MEASURED"


def test_class_latencies_and_the_p95_verdict():
    sent = [
        Sent("storefront", "realtime", "request", 0.0, 1, 1, sent_at=100.0, latency_s=1.5, status=200, job_ids=["a"]),
        Sent("storefront", "realtime", "request", 1.0, 1, 1, sent_at=101.0, latency_s=9.0, status=429),
        Sent("catalogue", "bulk", "submission", 2.0, 2, 4, sent_at=102.0, status=202, job_ids=["b", "c"]),
    ]
    latencies = class_latencies(sent, {"a": 101.5, "b": 110.0, "c": 122.0})
    assert latencies == {"realtime": [1.5], "bulk": [8.0, 20.0]}  # a 429 is not a latency
    verdicts = {
        t.name.split(":")[0]: t for t in p95_targets({"realtime": 2.0, "bulk": 20.0}, {"realtime": 2.4, "bulk": 26.0})
    }
    assert verdicts["realtime"].verdict == "PASS" and verdicts["realtime"].measured == pytest.approx(0.2)
    assert verdicts["bulk"].verdict == "FAIL" and verdicts["bulk"].measured == pytest.approx(0.3)
    assert p95_targets({"standard": 3.0}, {})[0].verdict == "NOT MEASURED"
