"""The batched pipeline: parity with diffusers, determinism, batch == solo, cancellation, hires-fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline
from PIL import Image

from zimage_platform.pipeline.buckets import Resolution
from zimage_platform.pipeline.types import GenerationRequest, HiresFix, StepEvent

S64 = Resolution(64, 64)
S128 = Resolution(128, 128)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def req(prompt: str, seed: int, **kw) -> GenerationRequest:
    kw.setdefault("size", S64)
    kw.setdefault("steps", 4)
    return GenerationRequest(prompt=prompt, seed=seed, request_id=f"{prompt}-{seed}-{kw.get('guidance', 0)}", **kw)


def test_single_request_matches_stock_zimage_pipeline(torch_engine):
    """Our loop over diffusers' components draws the image ZImagePipeline.__call__ draws."""
    stock = torch_engine.pipeline.pipe
    expected = stock(
        "a red fox in the snow",
        height=128,
        width=128,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(11),
    ).images[0]
    (ours,) = torch_engine.run([req("a red fox in the snow", 11, size=S128, steps=8)])
    assert np.array_equal(np.asarray(expected), np.asarray(ours.image))


def test_cfg_request_matches_stock_pipeline(base_torch_engine):
    stock = base_torch_engine.pipeline.pipe
    expected = stock(
        "white sneakers",
        negative_prompt="blurry",
        height=64,
        width=64,
        num_inference_steps=5,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    (ours,) = base_torch_engine.run([req("white sneakers", 3, steps=5, guidance=4.0, negative_prompt="blurry")])
    assert np.array_equal(np.asarray(expected), np.asarray(ours.image))


def test_img2img_matches_stock_img2img_pipeline(torch_engine):
    stock = ZImageImg2ImgPipeline(**torch_engine.pipeline.pipe.components)
    stock.set_progress_bar_config(disable=True)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    expected = stock(
        "make it night",
        image=source,
        strength=0.6,
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    (ours,) = torch_engine.run([req("make it night", 5, steps=8, init_image=source, strength=0.6)])
    assert np.array_equal(np.asarray(expected), np.asarray(ours.image))


SAMPLER_RUNS = [
    ("euler", "simple"),
    ("dpmpp_2m", "simple"),
    ("unipc", "simple"),
    ("res_multistep", "simple"),
    ("res_multistep", "karras"),
    ("euler", "beta"),
    ("dpmpp_2m", "sgm_uniform"),
]


@pytest.mark.parametrize(("sampler", "scheduler"), SAMPLER_RUNS)
def test_request_alone_twice_is_bitwise_identical(torch_engine, sampler, scheduler):
    first = torch_engine.run([req("a lighthouse", 42, sampler=sampler, scheduler=scheduler)])[0]
    torch_engine.pipeline.prompt_cache.clear()
    second = torch_engine.run([req("a lighthouse", 42, sampler=sampler, scheduler=scheduler)])[0]
    assert first.png == second.png


@pytest.mark.parametrize(("sampler", "scheduler"), SAMPLER_RUNS)
def test_batch_members_match_their_solo_runs(base_torch_engine, sampler, scheduler):
    """Different prompts, seeds, negative prompts and guidance scales in one CFG batch."""
    kw = {"sampler": sampler, "scheduler": scheduler}
    members = [
        req("a red fox", 1, guidance=3.0, negative_prompt="blurry", **kw),
        req("一只小猫坐在窗台上", 2, guidance=5.0, negative_prompt="低质量", **kw),
        req("mixed 混合 prompt with a panda 熊猫", 3, guidance=4.0, negative_prompt="", **kw),
    ]
    batched = base_torch_engine.run(members)
    for member, together in zip(members, batched, strict=True):
        (alone,) = base_torch_engine.run([member])
        assert max_diff(alone, together) <= 1, member.prompt
    # Different seeds really give different images (the test would pass vacuously otherwise).
    assert max_diff(batched[0], batched[1]) > 10


def test_samplers_and_schedules_change_the_image(torch_engine):
    """The new names are not aliases of Euler's simple schedule: each draws its own image."""
    euler = torch_engine.run([req("a lighthouse", 42, steps=6)])[0]
    res = torch_engine.run([req("a lighthouse", 42, steps=6, sampler="res_multistep")])[0]
    karras = torch_engine.run([req("a lighthouse", 42, steps=6, scheduler="karras")])[0]
    ddim = torch_engine.run([req("a lighthouse", 42, steps=6, sampler="ddim")])[0]
    assert euler.png != res.png and euler.png != karras.png
    assert ddim.png == euler.png  # ComfyUI runs ddim as Euler


def test_64_bit_seeds_are_the_generators_seed(torch_engine):
    """A 64-bit seed (ComfyUI's random seeds) goes to torch's CPU generator as it is, as ComfyUI
    hands it over: the starting noise is ComfyUI's for that seed. That generator (Mersenne
    Twister) is seeded from the low 32 bits, so — in ComfyUI too — seeds 2**32 apart draw the
    same noise."""
    big = 2**64 - 1
    request = req("a cat", big)
    scheduler = torch_engine.pipeline.pipe.scheduler
    noise = torch_engine.pipeline._initial_latents(request, scheduler, None)
    assert torch.equal(noise, torch.randn(1, 16, 8, 8, generator=torch.manual_seed(big)))
    (a,) = torch_engine.run([request])
    (b,) = torch_engine.run([req("a cat", big - 2**32)])
    (c,) = torch_engine.run([req("a cat", big - 1)])
    assert a.seed == big and max_diff(a, b) == 0 and max_diff(a, c) > 10


def test_png_text_chunks(torch_engine):

    (result,) = torch_engine.run([req("a cat", 1, png_text={"prompt": '{"3": {}}', "workflow": "{}"})])
    with Image.open(io.BytesIO(result.png)) as png:
        assert png.text == {"prompt": '{"3": {}}', "workflow": "{}"}
    (plain,) = torch_engine.run([req("a cat", 1)])
    with Image.open(io.BytesIO(plain.png)) as png:
        assert png.text == {} and np.array_equal(np.asarray(png), np.asarray(result.image))


def test_same_prompt_different_seeds_differ_and_seed_is_reported(torch_engine):
    a, b = torch_engine.run([req("a cat", 1), req("a cat", 2)])
    assert (a.seed, b.seed) == (1, 2)
    assert max_diff(a, b) > 10


def test_progress_reports_every_step_for_the_batch(torch_engine):
    events: list[StepEvent] = []
    members = [req("a", 1, steps=6), req("b", 2, steps=6)]
    torch_engine.run(members, on_progress=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e.total == 6 and set(e.request_ids) == {"a-1-0", "b-2-0"} for e in events)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "res_multistep"])
def test_cancel_one_member_at_a_step_boundary(torch_engine, sampler):
    """The cancelled member stops at the next boundary; the others finish as if alone."""
    members = [req("keep me", 1, steps=6, sampler=sampler), req("cancel me", 2, steps=6, sampler=sampler)]
    events: list[StepEvent] = []

    def is_cancelled(request_id: str) -> bool:
        return request_id == "cancel me-2-0" and len(events) >= 2

    kept, cancelled = torch_engine.run(members, on_progress=events.append, is_cancelled=is_cancelled)
    assert cancelled.cancelled and cancelled.image is None and cancelled.png is None
    assert not kept.cancelled
    assert [len(e.request_ids) for e in events] == [2, 2, 1, 1, 1, 1]
    (alone,) = torch_engine.run([members[0]])
    assert max_diff(alone, kept) <= 1


def test_cancelling_everyone_stops_the_loop(torch_engine):
    events: list[StepEvent] = []
    results = torch_engine.run(
        [req("x", 1, steps=8), req("y", 2, steps=8)], on_progress=events.append, is_cancelled=lambda _: len(events) >= 3
    )
    assert all(r.cancelled for r in results)
    assert len(events) == 3


def test_hires_fix_runs_two_passes_at_their_sizes(torch_engine):
    request = req("a castle", 9, size=S128, steps=4, hires=HiresFix(base_size=S64, denoise=0.5))
    events: list[StepEvent] = []
    (result,) = torch_engine.run([request], on_progress=events.append)
    assert result.image.size == (128, 128)
    assert [p.name for p in result.passes] == ["base", "hires"]
    assert [p.size for p in result.passes] == [S64, S128]
    assert [e.pass_name for e in events] == ["base"] * 4 + ["hires"] * 2  # denoise 0.5 of 4 steps
    base_only = torch_engine.run([req("a castle", 9, size=S64, steps=4)])[0]
    assert result.passes[0].batch_size == 1 and base_only.image.size == (64, 64)


def test_timings_cover_every_stage(torch_engine):
    (result,) = torch_engine.run([req("timing", 3, steps=3)])
    (t,) = result.passes
    assert len(t.denoise_step_s) == 3 and all(s > 0 for s in t.denoise_step_s)
    assert t.decode_s > 0 and t.png_encode_s > 0 and t.total_s >= t.denoise_s
    assert result.png.startswith(b"\x89PNG")


def test_prompt_cache_skips_the_text_encoder_for_repeated_prompts(torch_engine, monkeypatch):
    cache = torch_engine.pipeline.prompt_cache
    cache.clear()
    calls: list[list[str]] = []
    original = torch_engine.pipeline.pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_engine.pipeline.pipe, "encode_prompt", counting)
    torch_engine.run([req("templated product shot, red", 1), req("templated product shot, blue", 2)])
    torch_engine.run([req("templated product shot, red", 3)])
    assert calls == [["templated product shot, red", "templated product shot, blue"]]
    assert cache.stats.hits == 1 and cache.stats.misses == 2


def test_incompatible_requests_are_split_into_batches(torch_engine):
    """generate() groups by batch key: mixing sizes and steps still gives each its own image."""
    a, b = req("left", 1, size=S64, steps=2), req("right", 2, size=S128, steps=3)
    ra, rb = torch_engine.pipeline.generate([a, b])
    assert ra.image.size == (64, 64) and rb.image.size == (128, 128)
    assert len(ra.passes[0].denoise_step_s) == 2 and len(rb.passes[0].denoise_step_s) == 3
