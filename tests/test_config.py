"""Config: YAML + environment, one schema for every variant spec."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_platform.config import PoolConfig, load_config


def test_specs_load_from_the_engines_folder(config):
    assert set(config.variants) == {"turbo", "base", "edit"}
    assert config.variant("edit").mode == "img2img"
    assert config.engine.backend == "onnxruntime"


def test_environment_beats_the_file_and_overrides_beat_both(tmp_path: Path, monkeypatch):
    file = tmp_path / "platform.yaml"
    file.write_text("engine:\n  backend: torch\n  threads: 3\n")
    assert load_config(file).engine.backend == "torch"
    monkeypatch.setenv("ZIMAGE_ENGINE__BACKEND", "tensorrt")
    cfg = load_config(file)
    assert cfg.engine.backend == "tensorrt" and cfg.engine.threads == 3
    assert load_config(file, engine={"backend": "onnxruntime"}).engine.backend == "onnxruntime"
    monkeypatch.setenv("ZIMAGE_CONFIG", str(file))
    assert load_config().engine.threads == 3


def test_inline_variants_replace_the_folder(tmp_path: Path):
    cfg = load_config(
        variants={"turbo": {"name": "turbo", "checkpoint": "s3://models/z-image-turbo", "precision": "bf16"}},
        paths={"engines_dir": str(tmp_path)},
    )
    assert list(cfg.variants) == ["turbo"] and cfg.variant("turbo").precision == "bf16"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"engine": {"backend": "tvm"}}, "backend"),
        ({"buckets": ["1000x1000"]}, "multiple of 16"),
        ({"variants": {"turbo": {"name": "turbo", "defaults": {"steps": 99}}}}, "outside"),
        (
            {"variants": {"turbo": {"name": "turbo", "buckets": ["64x64"], "defaults": {"size": "128x128"}}}},
            "default size",
        ),
        (
            {"variants": {"turbo": {"name": "turbo", "buckets": ["32x32"], "defaults": {"size": "32x32"}}}},
            "not in the platform",
        ),
        ({"variants": {"turbo": {"name": "turbo", "defaults": {"size": "32x32"}}}}, "not in the platform"),
        ({"variants": {"turbo": {"name": "other"}}}, "does not match"),
        ({"engine": {"no_such_key": 1}}, "no_such_key"),
        ({"variants": {"turbo": {"name": "turbo", "limits": {"max_side": 4096}}}}, "max_side"),
        ({"variants": {"turbo": {"name": "turbo", "limits": {"min_side": 72}}}}, "multiples of 16"),
        ({"variants": {"turbo": {"name": "turbo", "defaults": {"scheduler": "ays"}}}}, "scheduler"),
        ({"variants": {"turbo": {"name": "turbo", "comfy_files": {"loras": ["x.safetensors"]}}}}, "loras"),
        (
            {
                "variants": {
                    "turbo": {"name": "turbo", "comfy_files": {"diffusion_models": ["z.safetensors"]}},
                    "base": {"name": "base", "comfy_files": {"diffusion_models": ["z.safetensors"]}},
                }
            },
            "named by both",
        ),
        ({"pools": {"cpu": {"tenant_share": {"bulk": 0}}}}, r"tenant_share\.bulk"),
        ({"pools": {"cpu": {"tenant_share": {"default": 1.5}}}}, r"tenant_share\.default"),
        ({"pools": {"cpu": {"tenant_share": {"premium": 0.5}}}}, r"tenant_share\.premium"),
    ],
)
def test_invalid_config_is_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(**overrides)


def test_comfy_file_names_per_variant(config):
    """engines/<variant>.yaml lists Comfy-Org's file names; text encoders and VAEs may be shared."""
    turbo, base = config.variant("turbo").comfy_files, config.variant("base").comfy_files
    assert "z_image_turbo_bf16.safetensors" in turbo["diffusion_models"]
    assert "z_image_bf16.safetensors" in base["diffusion_models"]
    assert turbo["vae"] == base["vae"] == ["ae.safetensors"]
    shared = load_config(
        variants={
            "turbo": {"name": "turbo", "comfy_files": {"vae": ["ae.safetensors"]}},
            "base": {"name": "base", "comfy_files": {"vae": ["ae.safetensors"]}},
        }
    )
    assert shared.variant("base").comfy_files == {"vae": ["ae.safetensors"]}


def test_unknown_variant_lists_the_valid_ones(config):
    from zimage_platform.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as err:
        config.variant("ultra")
    assert err.value.code == "unknown_variant" and err.value.choices == ["base", "edit", "turbo"]


def test_missing_config_file_is_an_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


def test_a_tenant_share_of_each_class_queue_by_default():
    """Half of each class's queue bound per tenant unless configured; a class may have its own."""
    pool = PoolConfig(queue_bound={"realtime": 64, "bulk": 101}, tenant_share={"default": 0.5, "bulk": 0.1})
    assert PoolConfig().tenant_share == {"default": 0.5}
    assert pool.tenant_bound("realtime") == 32 and pool.tenant_bound("bulk") == 10
    assert pool.tenant_bound("standard") is None  # no bound, no share
