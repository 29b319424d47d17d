"""Checkpoints are safetensors only; broken files are named, never a crash trace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zimage_platform.errors import CheckpointError
from zimage_platform.pipeline.checkpoint import inspect_checkpoint, load_pipeline, validate_checkpoint


@pytest.fixture
def copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


@pytest.mark.parametrize("name", ["transformer/diffusion_pytorch_model.bin", "vae/model.ckpt", "text_encoder/x.pt"])
def test_pickle_files_are_refused(copy: Path, name: str):
    (copy / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(copy)
    assert err.value.code == "checkpoint_unsafe_format"
    assert name.split("/")[-1] in err.value.message and "safetensors" in err.value.message


def test_truncated_weights_name_the_file(copy: Path):
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as err:
        load_pipeline(copy)
    assert err.value.code == "checkpoint_corrupt"
    assert str(weights) in err.value.message and "truncated" in err.value.message


def test_garbage_header_names_the_file(copy: Path):
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{not json at all" + b" " * 16
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(copy)
    assert str(weights) in err.value.message


def test_empty_weights_file_names_the_file(copy: Path):
    weights = copy / "text_encoder" / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        validate_checkpoint(copy)


def test_corrupt_config_names_the_file(copy: Path):
    (copy / "transformer" / "config.json").write_text("{ broken")
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(copy)
    assert "transformer/config.json" in err.value.message


def test_missing_component_and_folder(copy: Path, tmp_path: Path):
    shutil.rmtree(copy / "vae")
    with pytest.raises(CheckpointError, match="vae"):
        validate_checkpoint(copy)
    with pytest.raises(CheckpointError) as err:
        validate_checkpoint(tmp_path / "nowhere")
    assert err.value.code == "checkpoint_missing"


def test_flipped_weight_bytes_change_the_fingerprint(copy: Path, tiny_checkpoint: Path):
    """Same size, different content: framing checks pass, but the fingerprint moves."""
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert inspect_checkpoint(copy).fingerprint != inspect_checkpoint(tiny_checkpoint).fingerprint
    assert (
        inspect_checkpoint(copy).text_encoder_fingerprint
        == inspect_checkpoint(tiny_checkpoint).text_encoder_fingerprint
    )


def test_model_index_must_be_json(copy: Path):
    (copy / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"})[:-3])
    with pytest.raises(CheckpointError, match=r"model_index\.json"):
        validate_checkpoint(copy)
