"""Engines travel build Job → S3 → workers: `engines verify --upload` and `engines pull` against a
real S3 server (SeaweedFS, SigV4 checked), through the CLI the chart's Job and init container run."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from zimage_platform.cli import app
from zimage_platform.config import load_config
from zimage_platform.engines.engine import engine_folder
from zimage_platform.engines.manifest import MANIFEST_NAME, read_manifest, sha256_file
from zimage_platform.engines.publish import engine_targets, publish_engine, pull_engine
from zimage_platform.errors import EngineError
from zimage_platform.storage.results import ResultStore

pytestmark = pytest.mark.slow  # exports the tiny model to ONNX once (about 30 s)

TARGET = ("turbo", "onnxruntime", "fp32")


@pytest.fixture(scope="module")
def s3_env(s3):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
        yield s3


def write_config(folder: Path, config, s3, build_dir: Path) -> Path:
    """A user's config file: the session's tiny checkpoint, its own engine folder, the S3 endpoint,
    and turbo alone on its smallest bucket (so `engines targets` names one engine, quick to verify)."""
    path = folder / "zimage-platform.yaml"
    paths = {k: str(v) for k, v in config.paths.model_dump().items()} | {"engine_build_dir": str(build_dir)}
    turbo = config.variant("turbo").model_dump(mode="json")
    turbo["defaults"]["size"], turbo["buckets"] = "64x64", ["64x64"]
    path.write_text(
        yaml.safe_dump(
            {
                "paths": paths,
                "model_store": {"endpoint_url": s3.endpoint_url},
                "variants": {"turbo": turbo},
                "pools": {"cpu": {"num_cpus": 0.5}},
            }
        )
    )
    return path


def cli(config_file: Path, *args: str):
    result = CliRunner().invoke(app, ["--config", str(config_file), *args], catch_exceptions=False)
    return result, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def built(config, tiny_checkpoint, s3_env, tmp_path_factory) -> Path:
    """A turbo ONNX Runtime engine for the 64x64 bucket, built by the CLI into its own folder."""
    folder = tmp_path_factory.mktemp("publish")
    config_file = write_config(folder, config, s3_env, folder / "build")
    result, _ = cli(
        config_file, "engines", "build", "--variant", "turbo", "--backend", "onnxruntime", "--bucket", "64x64"
    )
    assert result.exit_code == 0, result.output
    return config_file


def test_targets_are_what_the_pools_serve(built):
    result = CliRunner().invoke(app, ["--config", str(built), "engines", "targets"], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.split("\n")[0] == " ".join(TARGET)
    h800 = load_config(Path(__file__).resolve().parents[2] / "deploy" / "config" / "h800-mig.yaml")
    assert engine_targets(h800) == [
        ("turbo", "tensorrt", "bf16"),
        ("base", "tensorrt", "fp8"),
        ("turbo", "tensorrt", "fp8"),
    ]
    assert engine_targets(h800, ["bulk"]) == [("turbo", "tensorrt", "fp8")]


def test_unverified_engines_are_not_published(built):
    with pytest.raises(EngineError) as caught:
        publish_engine(load_config(built), TARGET, f"s3://models/unverified-{uuid.uuid4().hex[:8]}")
    assert caught.value.code == "engine_unverified"


def test_verify_uploads_then_workers_pull(built, config, s3_env, tmp_path):
    uri = f"s3://models/engines-{uuid.uuid4().hex[:8]}"
    args = ("engines", "verify", "--variant", "turbo", "--backend", "onnxruntime", "--bucket", "64x64")
    result, lines = cli(built, *args, "--upload", uri)
    assert result.exit_code == 0, result.output
    uploaded = lines[-1]
    manifest = read_manifest(engine_folder(load_config(built), *TARGET))
    assert manifest is not None and manifest.verification[0].passed
    prefix = uri.removeprefix("s3://models/")
    assert uploaded["written"][-1] == f"{prefix}/turbo/onnxruntime-fp32/{MANIFEST_NAME}"
    assert len(uploaded["written"]) == len(manifest.files) + 1

    # Re-running the Job uploads only the manifest: the artifacts are already there, same sha256.
    result, lines = cli(built, *args, "--upload", uri)
    assert lines[-1]["written"] == [uploaded["written"][-1]]

    # A worker with an empty engine cache pulls exactly the verified files.
    worker = write_config(tmp_path, config, s3_env, tmp_path / "cache")
    result, lines = cli(worker, "engines", "pull", uri)
    assert result.exit_code == 0, result.output
    assert lines == [{"engine": "/".join(TARGET), "pulled": True}]
    pulled = engine_folder(load_config(worker), *TARGET)
    assert read_manifest(pulled) == manifest
    for name, digest in manifest.files.items():
        assert sha256_file(pulled / name) == digest
    result, lines = cli(worker, "engines", "pull", uri)
    assert lines == [{"engine": "/".join(TARGET), "pulled": False}]


def test_pull_names_a_missing_engine(built, tmp_path):
    result, _ = cli(built, "engines", "pull", f"s3://models/nothing-{uuid.uuid4().hex[:8]}")
    assert result.exit_code == 1
    assert "engine_not_published" in result.stderr and "turbo/onnxruntime/fp32" in result.stderr


def test_a_corrupted_upload_is_never_swapped_in(built, config, s3_env, tmp_path):
    uri = f"s3://models/engines-{uuid.uuid4().hex[:8]}"
    cfg = load_config(built)
    result, _ = cli(built, "engines", "verify", "--variant", "turbo", "--backend", "onnxruntime", "--bucket", "64x64")
    assert result.exit_code == 0, result.output
    publish_engine(cfg, TARGET, uri)
    manifest = read_manifest(engine_folder(cfg, *TARGET))
    name = sorted(manifest.files)[0]
    store = ResultStore("models", endpoint_url=s3_env.endpoint_url)
    store.put_bytes(f"{uri.removeprefix('s3://models/')}/turbo/onnxruntime-fp32/{name}", b"tampered", "x/y")
    worker = load_config(write_config(tmp_path, config, s3_env, tmp_path / "cache"))
    with pytest.raises(EngineError) as caught:
        pull_engine(worker, TARGET, uri)
    assert caught.value.code == "engine_corrupt"
    assert not engine_folder(worker, *TARGET).exists()
    assert not list((tmp_path / "cache" / "turbo").glob(".pull-*"))
