"""Caller parameters → requests: defaults from the variant spec, and clear refusals."""

from __future__ import annotations

import pytest
from PIL import Image

from zimage_platform.errors import InvalidRequest
from zimage_platform.pipeline.buckets import BucketSet, Resolution
from zimage_platform.pipeline.params import GenerationParams, resolve_requests


def resolve(config, variant="turbo", **kw):
    return resolve_requests(GenerationParams(**kw), config.variant(variant), config.buckets_for(variant))


def refusal(config, variant="turbo", **kw) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        resolve(config, variant, **kw)
    return err.value


def test_turbo_defaults_come_from_the_spec(config):
    (r,) = resolve(config, prompt="a cat", seed=5)
    assert (r.steps, r.guidance, r.shift, r.sampler) == (8, 0.0, 3.0, "euler")
    assert r.size == Resolution(256, 256) and not r.cfg and r.init_image is None


def test_base_uses_cfg_and_the_default_negative_prompt(config):
    (r,) = resolve(config, "base", prompt="a cat", seed=5)
    assert r.cfg and r.guidance == 4.0 and r.steps == 28 and "blurry" in r.negative_prompt


def test_n_expands_to_consecutive_seeds(config):
    rs = resolve(config, prompt="a cat", seed=100, n=3)
    assert [r.seed for r in rs] == [100, 101, 102]
    assert len({r.request_id for r in rs}) == 3


def test_unsupported_size_lists_every_bucket(config):
    err = refusal(config, prompt="x", size="1000x1000")  # not a multiple of 16
    assert err.code == "unsupported_size" and err.param == "size"
    assert "1024x1024" in err.choices and "576x1344" in err.choices and "64x64" in err.choices
    assert len(err.choices) == 15
    assert refusal(config, prompt="x", size="big").code == "invalid_size"


def test_unknown_sampler_names_the_supported_ones(config):
    err = refusal(config, prompt="x", sampler="dpmpp_sde")
    assert err.code == "unsupported_sampler"
    assert err.choices == ["euler", "res_multistep", "dpmpp_2m", "unipc", "ddim"]


def test_scheduler_is_a_comfyui_schedule_name(config):
    (r,) = resolve(config, prompt="x", scheduler="karras", seed=1)
    assert r.scheduler == "karras" and r.batch_key().scheduler == "karras"
    (default,) = resolve(config, prompt="x", seed=1)
    assert default.scheduler == "simple" and default.batch_key() != r.batch_key()
    err = refusal(config, prompt="x", scheduler="align_your_steps")
    assert err.code == "unsupported_scheduler" and "beta" in err.choices and "simple" in err.choices


def test_any_multiple_of_16_within_the_limits_is_a_size(config):
    """Buckets are the fast path; other sizes run as they are (never adjusted)."""
    (r,) = resolve(config, prompt="x", size="1152x768", seed=1)
    assert r.size == Resolution(1152, 768)
    sizes = config.buckets_for("turbo")
    assert not sizes.is_bucket(r.size) and sizes.is_bucket(Resolution(1024, 1024))
    # Metrics label every other size "dynamic": label values stay bounded.
    assert sizes.label(r.size) == "dynamic" and sizes.label("1024x1024") == "1024x1024"
    for bad in ("1000x1000", "16x16", "4096x64", "2048x2064"):
        err = refusal(config, prompt="x", size=bad)
        assert err.code == "unsupported_size" and "multiples of 16 between 64 and 2048" in err.message, bad
        assert "1024x1024" in err.choices
    tight = config.variant("turbo").model_copy(
        update={"limits": config.variant("turbo").limits.model_copy(update={"max_pixels": 512 * 512})}
    )
    with pytest.raises(InvalidRequest, match="at most 262144 pixels"):
        resolve_requests(
            GenerationParams(prompt="x", size="1024x768"), tight, BucketSet(["512x512"], tight.limits.size_rule)
        )


def test_seeds_span_64_bits(config):
    (r,) = resolve(config, prompt="x", seed=2**64 - 1)
    assert r.seed == 2**64 - 1
    rs = resolve(config, prompt="x", seed=2**64 - 2, n=2)
    assert [r.seed for r in rs] == [2**64 - 2, 2**64 - 1]
    err = refusal(config, prompt="x", seed=2**64 - 2, n=3)
    assert err.code == "seed_out_of_range" and str(2**64 - 3) in err.message
    assert refusal(config, prompt="x", seed=2**64).code == "seed_out_of_range"


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"steps": 0}, "steps_out_of_range"),
        ({"steps": 17}, "steps_out_of_range"),
        ({"guidance": 11.0}, "guidance_out_of_range"),
        ({"seed": -1}, "seed_out_of_range"),
        ({"n": 0}, "n_out_of_range"),
        ({"n": 17}, "n_out_of_range"),
        ({"shift": 0}, "shift_out_of_range"),
    ],
)
def test_out_of_range_values(config, kw, code):
    assert refusal(config, prompt="x", **kw).code == code


def test_prompt_checks(config):
    assert refusal(config, prompt="   ").code == "prompt_empty"
    assert refusal(config, prompt="x" * 9000).code == "prompt_too_long"
    (r,) = resolve(config, prompt="一只小猫坐在窗台上，阳光洒在它的毛发上", seed=1)
    assert r.prompt.startswith("一只小猫")


def test_edit_needs_an_image_and_takes_strength(config):
    assert refusal(config, "edit", prompt="make it night").code == "image_required"
    image = Image.new("RGBA", (100, 80))
    (r,) = resolve(config, "edit", prompt="make it night", image=image, seed=1)
    assert r.strength == 0.6 and r.init_image.mode == "RGB" and r.batch_key().strength == 0.6
    assert refusal(config, "edit", prompt="x", image=image, strength=1.5).code == "strength_out_of_range"
    assert refusal(config, "edit", prompt="x", image=image, strength=0.01, steps=8).code == "strength_too_low"


def test_hires_fix_validation(config):
    (r,) = resolve(config, prompt="x", size="512x512", hires_from="256x256", seed=1)
    assert r.hires.base_size == Resolution(256, 256) and r.hires.denoise == 0.5
    err = refusal(config, prompt="x", size="256x256", hires_from="512x512")
    assert err.code == "hires_not_smaller" and "128x128" in err.choices and "512x512" not in err.choices
    assert refusal(config, prompt="x", size="512x512", hires_from="300x300").code == "unsupported_size"
    assert (
        refusal(config, prompt="x", size="512x512", hires_from="256x256", image=Image.new("RGB", (8, 8))).code
        == "hires_with_image"
    )


def test_bucket_set_rejects_sizes_the_model_cannot_draw():
    with pytest.raises(ValueError, match="multiple of 16"):
        BucketSet(["1000x1000"])
    with pytest.raises(ValueError, match="duplicate"):
        BucketSet(["64x64", "64X64"])
