"""Built engines: manifests, refusal of stale or altered engines, verification, TensorRT refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from zimage_platform.engines import PipelineEngine, build_engine, engine_folder, read_manifest, verify_engine
from zimage_platform.engines.engine import bucket_profiles, dynamic_profile
from zimage_platform.engines.manifest import sha256_file
from zimage_platform.engines.tensorrt_backend import decoder_shapes, denoiser_shapes, plan_profiles
from zimage_platform.errors import BackendUnavailable, EngineError, InvalidRequest
from zimage_platform.pipeline.buckets import Resolution
from zimage_platform.pipeline.types import GenerationRequest


def test_manifest_records_source_tools_profiles_and_hashes(config, ort_engine, tiny_checkpoint):
    folder = engine_folder(config, "turbo", "onnxruntime")
    manifest = read_manifest(folder)
    assert manifest.checkpoint_fingerprint == ort_engine.checkpoint.fingerprint
    assert manifest.precision == "fp32" and manifest.onnx_opset >= 20
    assert {"torch", "diffusers", "onnx", "onnxruntime"} <= set(manifest.tools)
    assert len(manifest.buckets) == 15
    p1024 = manifest.profile("1024x1024")
    assert p1024.max_batch == 4 and p1024.denoiser_batch == (1, 4, 8) and p1024.caption_len == (32, 128, 512)
    for name, digest in manifest.files.items():
        assert sha256_file(folder / name) == digest


def test_onnx_runtime_images_match_torch(ort_engine, torch_engine):
    requests = [
        GenerationRequest(prompt="a red fox", size=Resolution(128, 128), seed=1, steps=8, request_id="a"),
        GenerationRequest(prompt="一只小猫", size=Resolution(128, 128), seed=2, steps=8, request_id="b"),
    ]
    for ours, ref in zip(ort_engine.run(requests), torch_engine.run(requests), strict=True):
        diff = np.abs(np.asarray(ours.image, dtype=np.int16) - np.asarray(ref.image, dtype=np.int16))
        assert diff.max() <= 2


def test_onnx_runtime_runs_sizes_outside_the_buckets(ort_engine, torch_engine):
    """The exported ONNX has dynamic height and width: a non-bucket size runs as it is and
    matches torch (the buckets are only the warmed-up fast path)."""
    size = Resolution(96, 160)
    assert size not in ort_engine.buckets
    request = GenerationRequest(prompt="a lighthouse", size=size, seed=3, steps=4, request_id="odd")
    (ours,), (ref,) = ort_engine.run([request]), torch_engine.run([request])
    assert ours.image.size == (96, 160)
    diff = np.abs(np.asarray(ours.image, dtype=np.int16) - np.asarray(ref.image, dtype=np.int16))
    assert diff.max() <= 2


def test_rebuilding_an_identical_engine_is_a_no_op_and_variants_share_exports(config, ort_engine):
    folder = engine_folder(config, "turbo", "onnxruntime")
    before = (folder / "denoiser.onnx").stat().st_mtime_ns
    build_engine(config, "turbo", "onnxruntime")
    assert (folder / "denoiser.onnx").stat().st_mtime_ns == before
    base = build_engine(config, "base", "onnxruntime")  # same checkpoint: linked, not re-exported
    turbo = read_manifest(folder)
    assert base.files == turbo.files and base.variant == "base"
    assert (engine_folder(config, "base", "onnxruntime") / "denoiser.onnx").stat().st_ino == (
        folder / "denoiser.onnx"
    ).stat().st_ino


@pytest.fixture
def scratch_config(config, tmp_path: Path, ort_engine):
    """A config whose build folder is a private copy, so tests can damage it."""
    scratch = config.model_copy(update={"paths": config.paths.model_copy(update={"engine_build_dir": tmp_path})})
    shutil.copytree(engine_folder(config, "turbo", "onnxruntime"), engine_folder(scratch, "turbo", "onnxruntime"))
    return scratch


def _load_error(cfg, variant="turbo") -> EngineError:
    with pytest.raises(EngineError) as err:
        PipelineEngine(cfg, variant, "onnxruntime").load()
    return err.value


def test_serving_refuses_an_engine_built_from_another_checkpoint(scratch_config):
    folder = engine_folder(scratch_config, "turbo", "onnxruntime")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["checkpoint_fingerprint"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    err = _load_error(scratch_config)
    assert err.code == "engine_checkpoint_mismatch" and "rebuild" in err.message


def test_serving_refuses_an_altered_engine_file(scratch_config):
    onnx = engine_folder(scratch_config, "turbo", "onnxruntime") / "vae_decoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0xFF
    onnx.write_bytes(bytes(data))
    assert _load_error(scratch_config).code == "engine_corrupt"


def test_serving_refuses_missing_engines_and_buckets(scratch_config):
    assert _load_error(scratch_config, "edit").code == "engine_not_built"
    folder = engine_folder(scratch_config, "turbo", "onnxruntime")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["profiles"] = [p for p in manifest["profiles"] if p["bucket"] != "512x512"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    err = _load_error(scratch_config)
    assert err.code == "engine_bucket_missing" and "512x512" in err.message


def test_verify_passes_for_onnxruntime_and_is_recorded(config, ort_engine):
    results = verify_engine(config, "turbo", "onnxruntime", buckets=["64x64", "128x128"])
    assert [r.bucket for r in results] == ["64x64", "128x128"]
    assert all(r.passed and r.max_pixel_diff <= r.tolerance and r.max_velocity_diff < 1e-3 for r in results)
    recorded = read_manifest(engine_folder(config, "turbo", "onnxruntime")).verification
    assert {v.bucket for v in recorded} >= {"64x64", "128x128"}


def test_verify_fails_above_tolerance(config, ort_engine):
    (result,) = verify_engine(config, "turbo", "onnxruntime", buckets=["64x64"], tolerance=-1)
    assert not result.passed


def test_engine_enforces_max_batch_and_served_sizes(torch_engine):
    too_many = [GenerationRequest(prompt="x", size=Resolution(1024, 1024), seed=i, steps=1) for i in range(5)]
    with pytest.raises(EngineError) as err:
        torch_engine.run(too_many)
    assert err.value.code == "batch_too_large"
    with pytest.raises(InvalidRequest) as bad:
        torch_engine.run([GenerationRequest(prompt="x", size=Resolution(100, 100), seed=1, steps=1)])
    assert bad.value.code == "unsupported_size" and "1024x1024" in bad.value.choices
    # A size outside the buckets runs on the dynamic-shape path, in batches of its own cap.
    assert torch_engine.max_batch(Resolution(96, 96)) == 2 and torch_engine.max_batch(Resolution(64, 64)) == 8
    odd = [GenerationRequest(prompt="x", size=Resolution(96, 96), seed=i, steps=1) for i in range(3)]
    with pytest.raises(EngineError) as err:
        torch_engine.run(odd)
    assert err.value.code == "batch_too_large"


def test_torch_needs_no_build_and_unknown_backends_are_named(config):
    with pytest.raises(InvalidRequest) as err:
        build_engine(config, "turbo", "torch")
    assert err.value.code == "nothing_to_build"
    with pytest.raises(InvalidRequest) as err:
        PipelineEngine(config, "turbo", "tvm")
    assert err.value.choices == ["onnxruntime", "tensorrt", "torch"]


def test_memory_report(torch_engine):
    report = torch_engine.memory()
    assert report.rss_bytes > 50_000_000 and report.peak_rss_bytes >= report.rss_bytes // 2
    assert report.gpu_allocated_bytes == 0


# -- TensorRT: no GPU or TensorRT here (say so, and test what runs without them) ------------


def test_tensorrt_says_plainly_that_it_is_unavailable(config):
    """TensorRT cannot be installed on these CPU machines: every entry point must say so."""
    with pytest.raises(BackendUnavailable) as err:
        build_engine(config, "turbo", "tensorrt")
    assert "TensorRT is not installed" in err.value.message and "GPU" in err.value.message
    with pytest.raises(BackendUnavailable):
        PipelineEngine(config, "turbo", "tensorrt").load()
    with pytest.raises(BackendUnavailable):
        verify_engine(config, "turbo", "tensorrt", buckets=["64x64"])


def test_tensorrt_profiles_one_per_bucket(config):
    spec = config.variant("turbo")
    profiles = bucket_profiles(spec, [Resolution(1024, 1024), Resolution(1344, 576)], 512)
    latents, timestep, captions, lens = denoiser_shapes(profiles[1], latent_channels=16, caption_dim=2560)
    assert latents.min == (1, 16, 72, 168) and latents.opt == (8, 16, 72, 168) and latents.max == (16, 16, 72, 168)
    assert captions.min == (1, 32, 2560) and captions.max == (16, 512, 2560)
    assert timestep.max == lens.max == (16,)
    (dec,) = decoder_shapes(profiles[0], latent_channels=16)
    assert dec.min == (1, 16, 128, 128) and dec.max == (4, 16, 128, 128)


def test_tensorrt_dynamic_profile_spans_every_allowed_size(config):
    """Sizes outside the buckets get one more optimisation profile (built last, so the buckets
    keep their indices): each side ranges over the variant's min_side..max_side."""
    spec = config.variant("turbo")
    dynamic = dynamic_profile(spec, 512)
    assert (dynamic.min_size, dynamic.opt_size, dynamic.max_size) == ("64x64", "256x256", "2048x2048")
    latents, timestep, captions, _ = denoiser_shapes(dynamic, latent_channels=16, caption_dim=2560)
    assert latents.min == (1, 16, 8, 8) and latents.opt == (2, 16, 32, 32) and latents.max == (4, 16, 256, 256)
    assert timestep.max == (4,) and captions.max == (4, 512, 2560)
    (dec,) = decoder_shapes(dynamic, latent_channels=16)
    assert dec.min == (1, 16, 8, 8) and dec.max == (2, 16, 256, 256)
    buckets = bucket_profiles(spec, [Resolution(1024, 1024)], 512)
    assert plan_profiles(buckets, dynamic) == [*buckets, dynamic]


def test_manifest_carries_the_dynamic_profile(config, ort_engine):
    manifest = read_manifest(engine_folder(config, "turbo", "onnxruntime"))
    assert manifest.dynamic_profile == dynamic_profile(config.variant("turbo"), config.engine.max_sequence_length)
    assert "dynamic" not in manifest.buckets


def test_onnx_runtime_threads_follow_omp_num_threads_as_torch_does(monkeypatch):
    """``engine.threads: 0``: ONNX Runtime's pool takes ``OMP_NUM_THREADS`` (Ray sets it to a
    replica's reserved CPUs) like torch, else every core; it ignored the variable before."""
    import os

    from zimage_platform.engines.onnxruntime_backend import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")
    assert default_threads() == (os.cpu_count() or 1)
