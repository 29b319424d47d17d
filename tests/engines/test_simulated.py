"""The benchmarks-only simulated engine: its time is the latency model's, split per stage and
step; its images are deterministic placeholders; progress, cancellation and refusals behave as
on a real engine; and a job runs through the real platform path (API, scheduler, runner, S3,
SQLite, ledger) in this process. Unit tests run on a virtual clock, so no assertion depends on
how fast this machine is."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from zimage_platform.config import PlatformConfig, load_config
from zimage_platform.engines import create_engine
from zimage_platform.engines.simulated import SimulatedEngine, SimulatedPipeline, placeholder_image
from zimage_platform.errors import EngineError, InvalidRequest
from zimage_platform.pipeline.buckets import Resolution
from zimage_platform.pipeline.types import GenerationRequest, HiresFix, StepEvent
from zimage_platform.scheduling.simulation.latency import ComputeModel
from zimage_platform.scheduling.work import WorkKey

REPO = Path(__file__).resolve().parents[2]
LATENCY = REPO / "ops" / "latency" / "h800-mig.yaml"
SIMULATED = {"acknowledge_not_real": True, "latency": str(LATENCY), "slice": "3g.40gb", "precision": "bf16"}


class VirtualClock:
    """``clock``/``sleep`` for :class:`SimulatedPipeline`: sleeping advances time, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def sim_config(config: PlatformConfig) -> PlatformConfig:
    data = config.model_dump(mode="json")
    data["engine"] |= {"backend": "simulated", "simulated": SIMULATED}
    return PlatformConfig.model_validate(data)


def virtual_engine(config: PlatformConfig, pool: str = "cpu") -> tuple[SimulatedEngine, VirtualClock]:
    engine = create_engine(config, "turbo", pool)
    assert isinstance(engine, SimulatedEngine)
    engine.load()
    clock = VirtualClock()
    assert engine.latency is not None
    engine.pipeline = SimulatedPipeline(engine.latency, clock=clock.clock, sleep=clock.sleep)
    return engine, clock


def request(i: int, size: str = "64x64", steps: int = 8, **kw) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"a red fox #{i}", size=Resolution.parse(size), seed=100 + i, steps=steps, request_id=f"r{i}", **kw
    )


def model_seconds(config: PlatformConfig, size: str, batch: int, steps: int = 8) -> float:
    """The compute model's own figure for the emulated slice, computed without the engine."""
    pool = config.pools["cpu"].model_copy(update={"mig_profile": "3g.40gb", "precision": "bf16"})
    emulated = config.model_copy(update={"pools": {"cpu": pool}})
    key = WorkKey("turbo", size, steps, False, "euler", 3.0, None, None)
    return ComputeModel.from_file(LATENCY, emulated).batch_seconds("cpu", key, batch)


@pytest.mark.parametrize(("size", "batch"), [("64x64", 1), ("64x64", 8), ("512x512", 2), ("1024x1024", 4)])
def test_a_batch_takes_the_latency_models_time(sim_config, size, batch):
    engine, clock = virtual_engine(sim_config)
    results = engine.run([request(i, size) for i in range(batch)])
    expected = model_seconds(sim_config, size, batch)
    assert clock.now == pytest.approx(expected, rel=1e-9)
    (timing,) = results[0].passes
    assert timing.batch_size == batch and len(timing.denoise_step_s) == 8
    assert timing.total_s == pytest.approx(expected, rel=1e-9)
    # the stages the real pipeline marks, so traces and stage metrics look alike
    assert [m.name for m in timing.marks] == ["text_encode", "denoise", "decode", "png_encode"]
    assert timing.marks[1].attributes == {"steps": 8}


def test_batching_gain_and_bucket_cost_follow_the_model(sim_config):
    engine, _ = virtual_engine(sim_config)
    assert engine.latency is not None
    key = engine.latency.key("64x64", 8)
    gain = engine.latency.batch_gain(key, 8)
    assert gain == pytest.approx(8 * model_seconds(sim_config, "64x64", 1) / model_seconds(sim_config, "64x64", 8))
    assert 1.0 < gain < 8.0
    assert engine.latency.batch_seconds(engine.latency.key("1024x1024", 8), 1) > engine.latency.batch_seconds(key, 1)


def test_sleeping_takes_no_cpu(sim_config):
    """Real clock: the engine's time is slept (no GIL, no CPU), not spun."""
    engine = create_engine(sim_config, "turbo", "cpu")
    engine.load()
    wall, cpu = time.perf_counter(), time.process_time()
    engine.run([request(0, "1024x1024")])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= model_seconds(sim_config, "1024x1024", 1)
    assert cpu < 0.25 * wall


def test_images_are_deterministic_placeholders_of_the_requested_size(sim_config):
    engine, _ = virtual_engine(sim_config)
    first = engine.run([request(1, "128x128"), request(2, "128x128")])
    again = engine.run([request(1, "128x128")])
    assert first[0].png == again[0].png and first[0].png != first[1].png
    image = Image.open(io.BytesIO(first[0].png))
    assert image.size == (128, 128) and "simulated" in image.text["Software"]
    assert image.convert("RGB").tobytes() == placeholder_image("a red fox #1", 101, 128, 128).tobytes()
    (other_seed,) = engine.run([GenerationRequest("a red fox #1", Resolution(128, 128), seed=7, steps=8)])
    assert other_seed.png != first[0].png


def test_progress_is_reported_after_every_step_of_every_pass(sim_config):
    engine, _ = virtual_engine(sim_config)
    events: list[StepEvent] = []
    engine.run([request(0, "128x128", hires=HiresFix(Resolution(64, 64), 0.5))], on_progress=events.append)
    assert [(e.pass_name, e.step, e.total) for e in events] == [("base", s, 8) for s in range(1, 9)] + [
        ("hires", s, 4) for s in range(1, 5)
    ]
    assert all(e.request_ids == ("r0",) for e in events)


def test_a_cancelled_member_leaves_at_the_next_step_boundary(sim_config):
    engine, clock = virtual_engine(sim_config)
    assert engine.latency is not None
    cancelled: set[str] = set()
    events: list[StepEvent] = []

    def progress(event: StepEvent) -> None:
        events.append(event)
        if event.step == 3:
            cancelled.add("r1")

    a, b = engine.run([request(0), request(1)], on_progress=progress, is_cancelled=cancelled.__contains__)
    assert a.png is not None and not a.cancelled
    assert b.png is None and b.cancelled
    assert [e.request_ids for e in events] == [("r0", "r1")] * 3 + [("r0",)] * 5
    # the remaining steps, decode and PNG take the smaller batch's time
    key = engine.latency.key("64x64", 8)
    two, one = engine.latency.stages(key, 2), engine.latency.stages(key, 1)
    expected = two.text_encode + 3 * two.denoise / 8 + 5 * one.denoise / 8 + one.decode + one.png_encode
    assert clock.now == pytest.approx(expected, rel=1e-9)


def test_when_every_member_is_cancelled_the_loop_stops(sim_config):
    engine, _ = virtual_engine(sim_config)
    events: list[StepEvent] = []
    (result,) = engine.run([request(0)], on_progress=events.append, is_cancelled=lambda _: len(events) >= 2)
    assert result.cancelled and result.png is None and [e.step for e in events] == [1, 2]


def test_the_simulated_backend_is_refused_without_the_acknowledgement(config, tmp_path):
    file = tmp_path / "zimage-platform.yaml"
    file.write_text("engine:\n  backend: simulated\n")
    with pytest.raises(ValidationError, match="acknowledge_not_real"):
        load_config(file)
    assert load_config(file, engine={"backend": "simulated", "simulated": {"acknowledge_not_real": True}})
    # a config copied without validation is refused by the engine itself
    unchecked = config.model_copy(update={"engine": config.engine.model_copy(update={"backend": "simulated"})})
    with pytest.raises(EngineError) as refused:
        create_engine(unchecked, "turbo", "cpu").load()
    assert refused.value.code == "simulated_not_acknowledged"


@pytest.mark.parametrize(
    ("settings", "code", "choice"),
    [
        ({"slice": None}, "simulated_slice_missing", "3g.40gb"),
        ({"slice": "5g.60gb"}, "unknown_slice", "1g.20gb"),
        ({"precision": "fp32"}, "unsupported_precision", "fp8"),
        ({"latency": "/nonexistent/latency.yaml"}, "simulated_latency_missing", None),
    ],
)
def test_what_the_simulated_engine_cannot_emulate_is_refused_with_the_choices(sim_config, settings, code, choice):
    settings = {k: Path(v) if k == "latency" else v for k, v in settings.items()}
    engine_cfg = sim_config.engine.model_copy(
        update={"simulated": sim_config.engine.simulated.model_copy(update=settings)}
    )
    with pytest.raises((InvalidRequest, EngineError)) as refused:
        create_engine(sim_config.model_copy(update={"engine": engine_cfg}), "turbo", "cpu").load()
    assert refused.value.code == code
    if choice is not None:
        assert choice in refused.value.choices


def test_the_pools_own_slice_and_precision_are_the_default(sim_config):
    pool = sim_config.pools["cpu"].model_copy(update={"mig_profile": "1g.20gb", "precision": "fp8"})
    settings = sim_config.engine.simulated.model_copy(update={"slice": None, "precision": None})
    config = sim_config.model_copy(
        update={"pools": {"cpu": pool}, "engine": sim_config.engine.model_copy(update={"simulated": settings})}
    )
    engine = create_engine(config, "turbo", "cpu")
    engine.load()
    about = engine.describe()
    assert (about["slice"], about["precision"], about["backend"], about["not_real"]) == (
        "1g.20gb",
        "fp8",
        "simulated",
        True,
    )


async def test_a_job_runs_through_the_platform_on_the_simulated_engine(sim_config, s3, tmp_path):
    """The real platform path in this process (no Ray): HTTP API, scheduler, runner, SeaweedFS S3,
    SQLite job rows and ledger, with the simulated engine in place of the model."""
    import httpx
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from isolated import isolated_config
    from tenants import add_tenant
    from zimage_platform.billing.ledger import LedgerEntryRow
    from zimage_platform.serve.inprocess import InProcessPlatform

    config = isolated_config(sim_config, s3, tmp_path, limits={"sync_timeout_s": 60})
    key = add_tenant(config, "acme", priority_class="standard")
    engine = create_engine(config, "turbo", "cpu")
    engine.load()
    platform = InProcessPlatform(config, {"turbo": engine})
    await platform.start()
    try:
        transport = httpx.ASGITransport(app=platform.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://platform", timeout=60) as client:
            client.headers["Authorization"] = f"Bearer {key}"
            answer = await client.post(
                "/v1/images/generations",
                json={"prompt": "a lighthouse", "size": "64x64", "seed": 5, "response_format": "b64_json"},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            png = base64.b64decode(body["data"][0]["b64_json"])
            assert Image.open(io.BytesIO(png)).convert("RGB").tobytes() == (
                placeholder_image("a lighthouse", 5, 64, 64).tobytes()
            )
            job = (await client.get(f"/v1/jobs/{body['job_id']}")).json()
            models = (await client.get("/v1/models")).json()
    finally:
        await platform.stop()
    assert job["status"] == "succeeded"
    (image,) = job["images"]
    stages = image["timings"][0]
    assert len(stages["denoise_step_s"]) == 8
    # Deadlines: never early. A serving replica encodes the PNG after it releases the engine, so
    # the engine's part is the model's time without its host-side PNG share.
    png_share = engine.latency.stages(engine.latency.key("64x64", 8), 1).png_encode
    assert stages["total_s"] - stages["png_encode_s"] >= 0.999 * (model_seconds(config, "64x64", 1) - png_share)
    assert {m["variant"]: m["backend"] for m in models["data"]}["turbo"] == "simulated"
    with Session(platform.services.store.engine) as session:
        bills = session.scalars(select(LedgerEntryRow).where(LedgerEntryRow.job_id == body["job_id"])).all()
    assert [b.backend for b in bills] == ["simulated"]


def test_nothing_is_built_or_loaded_for_the_simulated_engine(sim_config, tmp_path):
    from zimage_platform.engines import get_backend, is_compiled
    from zimage_platform.engines.publish import engine_targets
    from zimage_platform.serve.launcher import prepare_engines

    config = sim_config.model_copy(update={"paths": sim_config.paths.model_copy(update={"data_dir": tmp_path})})
    prepare_engines(config)
    assert not config.paths.tiny_checkpoint.exists()
    assert engine_targets(config) == [] and not is_compiled("simulated")
    with pytest.raises(InvalidRequest) as refused:
        get_backend("simulated")
    assert refused.value.code == "simulated_backend" and "onnxruntime" in refused.value.choices
