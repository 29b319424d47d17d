"""The offline tiny checkpoint: real classes, deterministic bytes, a tokenizer that speaks Chinese."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from zimage_platform.pipeline.checkpoint import fingerprint
from zimage_platform.pipeline.tiny import init_tiny_checkpoint


def test_building_twice_gives_identical_files(tmp_path: Path, tiny_checkpoint: Path):
    again = init_tiny_checkpoint(tmp_path / "again")
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tiny_checkpoint) for p in tiny_checkpoint.rglob("*") if p.is_file())
    for rel in files:
        assert (again / rel).read_bytes() == (tiny_checkpoint / rel).read_bytes(), rel
    assert fingerprint(again) == fingerprint(tiny_checkpoint)


def test_layout_and_classes_are_z_image_turbos(tiny_checkpoint: Path):
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    scheduler = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    vae = json.loads((tiny_checkpoint / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16
    assert not list(tiny_checkpoint.rglob("*.bin"))


@pytest.mark.parametrize(
    "text",
    [
        "一只小猫坐在窗台上，阳光洒在它的毛发上。",
        "Mixed prompt 混合提示: a panda 熊猫 eating bamboo, 4K",
        "emoji 🐼 and full-width ＡＢＣ and ﬁ ligature",
        "繁體字與簡體字混用：電商產品圖",
    ],
)
def test_tokenizer_round_trips_chinese_and_mixed_prompts(tiny_checkpoint: Path, text: str):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # it learned merges, not just bytes


def test_chat_template_wraps_the_prompt_as_a_user_turn(tiny_checkpoint: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "一只猫"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\n一只猫<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
