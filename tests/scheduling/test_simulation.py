"""The capacity simulator: the platform's own dispatcher, queues and admission in simulated time."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zimage_platform.cli import app
from zimage_platform.config import AutoscalingConfig, PlatformConfig, PoolConfig, load_config
from zimage_platform.scheduling.autoscaling import ReplicaAutoscaler
from zimage_platform.scheduling.simulation import (
    ComputeModel,
    LoadProfile,
    MeasuredLatency,
    Simulation,
    load_latency,
    load_profile,
    search_replicas,
    simulate,
)
from zimage_platform.scheduling.work import WorkKey

REPO = Path(__file__).resolve().parents[2]
H800 = REPO / "deploy/config/h800-mig.yaml"
LATENCY = REPO / "ops/latency/h800-mig.yaml"
PROMO = REPO / "ops/profiles/promo-5000-10min.yaml"


@pytest.fixture(scope="module")
def h800() -> PlatformConfig:
    return load_config(H800)


def one_pool(config: PlatformConfig, **pool: object) -> PlatformConfig:
    """Every class on one pool of 3g.40gb slices (strict priority decides who waits)."""
    settings = {
        "mig_profile": "3g.40gb",
        "gpu_fraction": 0.4286,
        "classes": ["realtime", "standard", "bulk"],
        "variants": ["turbo"],
        "max_batch": {"default": 1},
        "max_wait_ms": {"default": 0},
        "autoscaling": AutoscalingConfig(min_replicas=2, max_replicas=2),
        **pool,
    }
    return config.model_copy(update={"pools": {"all": PoolConfig(**settings)}})


def profile(**fields: object) -> LoadProfile:
    data: dict = {
        "name": "test",
        "duration_s": 600,
        "seed": 3,
        "streams": [
            {"name": c, "tenant": f"t-{c}", "priority_class": c, "rate_per_s": 0.25, "size": "1024x1024"}
            for c in ("realtime", "standard", "bulk")
        ],
    }
    data.update(fields)
    return LoadProfile.model_validate(data)


def comparable(result) -> dict:
    data = result.to_dict()
    data.pop("wall_s")
    return data


def test_same_seed_same_result_other_seed_other_result(h800: PlatformConfig):
    latency = load_latency(LATENCY, h800)
    load = load_profile(PROMO)
    first, second = simulate(h800, load, latency), simulate(h800, load, latency)
    assert comparable(first) == comparable(second)
    other = simulate(h800, load.model_copy(update={"seed": 8}), latency)
    assert comparable(other)["classes"] != comparable(first)["classes"]


def test_every_request_is_admitted_or_refused_and_every_admitted_one_is_accounted_for(h800: PlatformConfig):
    result = simulate(h800, load_profile(PROMO), load_latency(LATENCY, h800))
    assert result.classes
    for cls, c in result.classes.items():
        assert c["requests"] == c["admitted"] + c["rejected_total"], cls
        assert c["admitted"] == c["completed"] + c["timed_out"] + c["unfinished"], cls
        assert c["images_done"] <= c["images_admitted"], cls
    # The promotion overloads the deployed minimums: the storefront (the one realtime tenant) fills
    # its share of the realtime queue (half of the bound of 64), and the excess turns into 429s.
    assert result.classes["realtime"]["rejected"]["tenant_queue_share"] > 0
    assert result.classes["realtime"]["peak_queue"] == 32


def test_one_tenant_flooding_a_class_queue_leaves_room_for_the_others(h800: PlatformConfig):
    """The live service's admission in simulated time: the flood is held to its share of the
    realtime queue (``tenant_queue_share``); the other realtime tenant is never turned away."""
    config = one_pool(h800, queue_bound={"realtime": 10, "standard": 10, "bulk": 10})
    streams = [
        {"name": "flood", "tenant": "big", "priority_class": "realtime", "rate_per_s": 3.0},
        {"name": "trickle", "tenant": "small", "priority_class": "realtime", "rate_per_s": 0.1},
    ]
    result = simulate(config, profile(streams=streams), load_latency(LATENCY, h800))
    rt = result.classes["realtime"]
    assert rt["rejected"]["tenant_queue_share"] > 0.3 * rt["requests"]
    assert "queue_full" not in rt["rejected"]  # the flood alone never fills the class queue
    assert rt["peak_queue"] < 10  # the flood holds at most 5 places (half of 10); the rest stay free


def test_strict_priority_shows_in_the_latencies(h800: PlatformConfig):
    """Equal traffic per class on one shared pool at ~90% load: realtime waits least, bulk most."""
    result = simulate(one_pool(h800), profile(), load_latency(LATENCY, h800))
    p95 = {c: result.classes[c]["latency_s"]["p95"] for c in ("realtime", "standard", "bulk")}
    assert p95["realtime"] < p95["standard"] < p95["bulk"], p95
    assert result.classes["realtime"]["latency_s"]["p50"] < 2 * 2.5  # about one image's engine time


def test_queue_bounds_answer_429_and_admit_nothing_over_them(h800: PlatformConfig):
    config = one_pool(h800, queue_bound={"realtime": 5, "standard": 5, "bulk": 5}, tenant_share={"default": 1.0})
    load = profile(streams=[{"name": "rt", "tenant": "t", "priority_class": "realtime", "rate_per_s": 2.0}])
    result = simulate(config, load, load_latency(LATENCY, h800))
    rt = result.classes["realtime"]
    assert rt["rejected"]["queue_full"] > 0.5 * rt["requests"]  # 2/s offered, under 1/s served
    assert rt["peak_queue"] == 5
    assert rt["admitted"] == rt["completed"]


def test_tenant_concurrency_cap_and_monthly_quota_refuse_like_the_live_scheduler(h800: PlatformConfig):
    load = profile(
        streams=[
            {"name": "capped", "tenant": "a", "priority_class": "realtime", "rate_per_s": 2.0, "concurrent_jobs": 2},
            {
                "name": "quota",
                "tenant": "b",
                "priority_class": "standard",
                "rate_per_s": 0.2,
                "monthly_images": 100,
                "used_this_month": 90,
            },
        ]
    )
    result = simulate(one_pool(h800), load, load_latency(LATENCY, h800))
    assert result.classes["realtime"]["rejected"]["concurrency_limit"] > 0
    assert result.classes["standard"]["admitted"] == 10
    assert result.classes["standard"]["rejected"]["quota_exceeded"] == result.classes["standard"]["requests"] - 10


def test_autoscaling_delays_cost_latency(h800: PlatformConfig):
    """A burst on a queue-aware autoscaler: longer upscale delay and start-up → worse p95."""
    load = profile(
        duration_s=900,
        streams=[
            {
                "name": "rt",
                "tenant": "t",
                "priority_class": "realtime",
                "rate_per_s": 0.2,
                "bursts": [{"start_s": 300, "end_s": 600, "rate_per_s": 2.0}],
            }
        ],
    )
    latency = load_latency(LATENCY, h800)

    def run(delay: float, startup: float):
        scaling = AutoscalingConfig(min_replicas=1, max_replicas=16, upscale_delay_s=delay, downscale_delay_s=60)
        config = one_pool(h800, autoscaling=scaling, queue_bound={"realtime": 10_000})
        return simulate(config, load.model_copy(update={"startup_s": {"default": startup}}), latency)

    quick, slow = run(5, 30), run(120, 180)
    p95 = lambda r: r.classes["realtime"]["latency_s"]["p95"]  # noqa: E731
    assert p95(quick) < p95(slow)
    assert quick.pools["all"]["deployments"]["turbo"]["peak_replicas"] > 1
    # A promotion's floor, open from the start of the burst, holds the replicas up before the
    # queue would have asked for them: the same policy with a floor beats the slow scaler.
    floor = {"start": load.start + timedelta(seconds=120), "end": load.start + timedelta(hours=1), "min_replicas": 8}
    scaling = AutoscalingConfig(
        min_replicas=1, max_replicas=16, upscale_delay_s=120, downscale_delay_s=60, floors=[floor]
    )
    floored = simulate(
        one_pool(h800, autoscaling=scaling, queue_bound={"realtime": 10_000}),
        load.model_copy(update={"startup_s": {"default": 180}}),
        latency,
    )
    assert floored.pools["all"]["deployments"]["turbo"]["peak_replicas"] >= 8
    assert p95(floored) < p95(slow)


def test_autoscaler_waits_its_delays_and_replicas_start_later():
    scaler = ReplicaAutoscaler(
        AutoscalingConfig(min_replicas=1, max_replicas=8, upscale_delay_s=10, downscale_delay_s=30, look_back_s=1e-3),
        slots=1,
        startup_s=60,
    )
    assert scaler.observe(0, 4) == 0 and scaler.total == 1
    assert scaler.observe(9, 4) == 0 and scaler.total == 1  # not wanted long enough yet
    scaler.observe(10, 4)
    assert (scaler.ready, scaler.total) == (1, 4)  # three starting
    assert scaler.promote(69) == 0 and scaler.promote(70) == 3
    assert scaler.observe(71, 1) == 0
    assert scaler.observe(101, 1) == -3 and scaler.total == 1


def test_from_zero_one_replica_starts_at_once_and_the_rest_once_it_reports():
    """As on Serve (bench autoscale): with no replica serving, the policy sees the scheduler's one
    wake-up call, not the queue; the queue's size shows once a replica serves, then the delay."""
    scaler = ReplicaAutoscaler(
        AutoscalingConfig(min_replicas=0, max_replicas=4, upscale_delay_s=5, downscale_delay_s=30, look_back_s=1e-3),
        slots=1,
        startup_s=30,
    )
    assert scaler.total == 0
    scaler.observe(0, 6)
    assert (scaler.ready, scaler.total) == (0, 1)  # at once, but one
    scaler.observe(20, 6)
    assert scaler.total == 1  # still starting: nothing reports the queue
    assert scaler.promote(30) == 1
    scaler.observe(31, 6)
    scaler.observe(35, 6)
    assert scaler.total == 1  # the upscale delay runs from when the queue showed
    scaler.observe(36, 6)
    assert (scaler.ready, scaler.total) == (1, 4)


def test_compute_model_matches_the_stated_flops():
    config = load_config(H800)
    model = ComputeModel.from_file(LATENCY, config)
    assert model.forward_flops("1024x1024") == pytest.approx(6.0e13, rel=0.02)
    turbo = WorkKey("turbo", "1024x1024", 8, False, "euler", 3.0, None, None)
    base = turbo._replace(variant="base", steps=28, cfg=True)
    # CFG doubles the forwards; 28 steps vs 8.
    assert model.image_flops(base)["denoise"] == pytest.approx(7 * model.image_flops(turbo)["denoise"])
    # Achieved TFLOP/s as the parameter: doubling it roughly halves the engine time.
    fast = ComputeModel.from_file(
        LATENCY, config, achieved_tflops={"3g.40gb": {"bf16": 2 * model.tflops("realtime", "turbo")}}
    )
    assert fast.batch_seconds("realtime", turbo, 1) < 0.55 * model.batch_seconds("realtime", turbo, 1)


def test_measured_latency_fits_a_line_per_bucket():
    model = MeasuredLatency({"64x64": {1: 0.10, 4: 0.25}})
    key = WorkKey("turbo", "64x64", 8, False, "euler", 3.0, None, None)
    assert model.batch_seconds("cpu", key, 1) == pytest.approx(0.10)
    assert model.batch_seconds("cpu", key, 2) == pytest.approx(0.15)
    assert model.batch_seconds("cpu", key._replace(steps=4), 4) == pytest.approx(0.125)
    bench = MeasuredLatency.from_bench_json(REPO / "bench/results/engine.json")
    assert set(bench.points) >= {"64x64", "256x256"}


def test_latency_models_cover_sizes_outside_the_buckets():
    """A non-bucket size (any multiple of 16) still has a latency: measured tables scale the
    nearest measured size by pixels; the compute model counts its tokens."""
    model = MeasuredLatency({"64x64": {1: 0.10, 4: 0.25}, "256x256": {1: 1.0, 4: 2.5}})
    key = WorkKey("turbo", "96x96", 8, False, "euler", 3.0, None, None)
    assert model.batch_seconds("cpu", key, 1) == pytest.approx(0.10 * 96 * 96 / (64 * 64))
    big = key._replace(size="320x256")
    assert model.batch_seconds("cpu", big, 4) == pytest.approx(2.5 * 320 * 256 / (256 * 256))
    compute = ComputeModel.from_file(LATENCY, load_config(H800))
    odd = WorkKey("turbo", "1152x768", 8, False, "euler", 3.0, None, None)
    square = odd._replace(size="1024x1024")
    assert 0 < compute.batch_seconds("realtime", odd, 1) < compute.batch_seconds("realtime", square, 1)


def test_search_finds_the_fewest_replicas_that_meet_the_slos(h800: PlatformConfig):
    latency = load_latency(LATENCY, h800)
    load = load_profile(PROMO)
    found = search_replicas(h800, load, latency)
    assert found.feasible and found.result.slo_met
    assert found.replicas["standard/base"] == 0  # no stream uses it
    # One replica fewer on the realtime pool misses realtime's SLO.
    fewer = {name: n for name, n in found.replicas.items()}
    fewer["realtime/turbo"] -= 1
    replicas = {tuple(k.split("/")): v for k, v in fewer.items()}
    missed = Simulation(h800, load, latency, replicas=replicas, autoscale=False).run()
    assert not missed.slo["realtime"]["met"]


def test_plan_cli_prints_the_report_and_json():
    runner = CliRunner()
    args = ["--config", str(H800), "plan", "--profile", str(PROMO), "--latency", str(LATENCY)]
    text = runner.invoke(
        app, [*args, "--replicas", "realtime=40", "--replicas", "standard/turbo=24", "--replicas", "bulk=8"]
    )
    assert text.exit_code == 0, text.output
    assert "realtime" in text.stdout and "p95 s" in text.stdout and "GPU-hours" in text.stdout
    data = json.loads(runner.invoke(app, [*args, "--json", "--replicas", "realtime=40"]).stdout)
    assert data["pools"]["realtime"]["deployments"]["turbo"]["peak_replicas"] == 40
    assert set(data["classes"]) == {"realtime", "standard", "bulk"}
    bad = runner.invoke(app, [*args, "--replicas", "gpu=3"])
    assert bad.exit_code == 2 and "unknown pool 'gpu'" in bad.stderr
    table = runner.invoke(app, ["--config", str(H800), "plan", "--latency-table"])
    assert table.exit_code == 0 and "3g.40gb" in table.stdout


def test_replayed_arrivals_and_measured_spread_are_deterministic(h800: PlatformConfig):
    """What ``bench capacity`` feeds the simulator: recorded send times and measured samples."""
    latency = MeasuredLatency.from_samples(
        {"1024x1024": {1: [2.0, 2.2, 3.0], 2: [3.5, 4.5]}}, {0: [0.01, 0.02], 4: [0.5]}
    )
    assert latency.request_overhead(0) in (0.01, 0.02) and latency.request_overhead(9) == 0.5
    # One ratio per batch sample to its size's line (mean 2.4 s at 1, 4.0 s at 2): the spread kept.
    assert len(latency.ratios) == 5 and min(latency.ratios) < 1 < max(latency.ratios)
    times = [0.5 * i for i in range(40)]
    load = profile(streams=[{"name": "rt", "tenant": "t", "priority_class": "realtime", "times": times}])
    config = one_pool(h800)
    first, second = simulate(config, load, latency), simulate(config, load, latency)
    assert first.classes["realtime"]["requests"] == 40 == first.classes["realtime"]["completed"]
    assert comparable(first) == comparable(second)
