"""Checkpoints from an ``s3://`` prefix, against a real S3 server (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_platform.errors import CheckpointError
from zimage_platform.pipeline.checkpoint import fetch_s3_checkpoint, fingerprint, resolve_checkpoint


def upload(s3, folder: Path, prefix: str) -> None:
    client = s3.client()
    for file in folder.rglob("*"):
        if file.is_file():
            client.upload_file(str(file), "models", f"{prefix}/{file.relative_to(folder).as_posix()}")


@pytest.fixture
def aws_env(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)


def test_checkpoint_from_s3_prefix_is_identical(s3, aws_env, tiny_checkpoint: Path, tmp_path: Path):
    upload(s3, tiny_checkpoint, "z-image/tiny-v1")
    local = resolve_checkpoint(
        "s3://models/z-image/tiny-v1",
        tiny_dir=tmp_path / "unused",
        s3_cache_dir=tmp_path / "cache",
        endpoint_url=s3.endpoint_url,
        region="us-east-1",
    )
    assert fingerprint(local) == fingerprint(tiny_checkpoint)
    # A second fetch reuses the complete local copy.
    mtime = (local / "model_index.json").stat().st_mtime_ns
    fetch_s3_checkpoint(
        "s3://models/z-image/tiny-v1", tmp_path / "cache", endpoint_url=s3.endpoint_url, region="us-east-1"
    )
    assert (local / "model_index.json").stat().st_mtime_ns == mtime


def test_pickles_on_s3_are_refused_before_download(s3, aws_env, tiny_checkpoint: Path, tmp_path: Path):
    upload(s3, tiny_checkpoint, "z-image/with-pickle")
    s3.client().put_object(Bucket="models", Key="z-image/with-pickle/transformer/model.ckpt", Body=b"\x80\x04")
    with pytest.raises(CheckpointError) as err:
        fetch_s3_checkpoint(
            "s3://models/z-image/with-pickle", tmp_path / "c", endpoint_url=s3.endpoint_url, region="us-east-1"
        )
    assert err.value.code == "checkpoint_unsafe_format" and "model.ckpt" in err.value.message
    assert not (tmp_path / "c").exists()


def test_empty_prefix_and_bad_credentials(s3, aws_env, tmp_path: Path, monkeypatch):
    with pytest.raises(CheckpointError) as err:
        fetch_s3_checkpoint(
            "s3://models/nothing-here", tmp_path / "c", endpoint_url=s3.endpoint_url, region="us-east-1"
        )
    assert err.value.code == "checkpoint_missing"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(CheckpointError) as err:
        fetch_s3_checkpoint("s3://models/z-image", tmp_path / "c", endpoint_url=s3.endpoint_url, region="us-east-1")
    assert err.value.code == "checkpoint_unreachable"
