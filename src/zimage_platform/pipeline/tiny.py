"""Build a tiny Z-Image checkpoint offline, deterministically.

No weights can be downloaded on these machines, so the platform makes its own checkpoint with
the *real* classes in the real folder layout (``transformer/``, ``text_encoder/`` (Qwen3),
``tokenizer/``, ``vae/`` (16-channel AutoencoderKL), ``scheduler/``): same code path as
Tongyi-MAI/Z-Image-Turbo, tiny sizes, seeded random weights. It draws noise, not pictures.

Determinism: every component is built from a fixed seed on CPU in float32 and saved as
safetensors; the tokenizer is trained on the corpus below with a deterministic BPE trainer.
Building twice gives byte-identical files (tested).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

TINY_SEED = 20251126

#: A small bilingual corpus: enough for a byte-level BPE to learn common English and Chinese
#: merges. Byte-level BPE round-trips any UTF-8 text whatever it learned.
_CORPUS = """
A photo of a red fox sitting in fresh snow, golden hour light, shallow depth of field.
An e-commerce product shot of white sneakers on a clean studio background, soft shadows.
A watercolor painting of a lighthouse on a cliff above a stormy sea at night.
Portrait of an old fisherman with a grey beard, cinematic lighting, 85mm lens, film grain.
A cozy coffee shop interior with wooden tables, plants and warm lamps, rainy window.
Poster design for a summer sale: bold typography, bright colors, beach umbrellas and waves.
A bowl of ramen with soft boiled egg, green onions and chili oil, top-down food photography.
Futuristic city skyline at dusk with flying cars and neon signs reflected in the river.
Minimalist logo of a mountain and a rising sun, flat vector style, two colors.
A cat wearing a tiny astronaut helmet floating inside a space station, photorealistic.
一只小猫坐在窗台上，阳光洒在它的毛发上，背景是城市的天际线。
一幅中国山水画，远山如黛，近处有小桥流水和几户人家，意境悠远。
电商产品图：白色运动鞋放在简洁的摄影棚背景上，柔和的阴影，高清细节。
一位穿着汉服的女孩站在樱花树下，微风吹过，花瓣飘落，电影感光影。
夜晚的上海外滩，灯火辉煌，黄浦江上倒映着霓虹灯，广角镜头。
一碗热气腾腾的牛肉面，配有香菜和辣椒油，俯拍美食摄影。
夏日促销海报：醒目的字体，明亮的色彩，沙滩遮阳伞和海浪。
一只戴着宇航员头盔的猫漂浮在空间站里，照片级真实感。
古老的寺庙在雾中若隐若现，清晨的第一缕阳光照在屋檐上。
Mixed prompt 混合提示: a panda 熊猫 eating bamboo 竹子 in a misty forest 森林, 4K, ultra detailed.
Negative: blurry, low quality, watermark, text, deformed hands, extra fingers. 模糊，低质量，水印。
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

#: Qwen3-style chat template (written for this project): Z-Image wraps every prompt as a user
#: turn and opens the assistant turn, with thinking enabled (no empty think block).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

TEXT_HIDDEN = 64
TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=TEXT_HIDDEN,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1024, 512, 512],
)


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE with Qwen2's pre-tokenizer and wrap it in ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()], trainer=trainer)
    model = raw.model
    vocab = raw.get_vocab()
    merges = _merges_of(model)
    # Special tokens after the learned vocabulary, in a fixed order.
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=dict(sorted(vocab.items(), key=lambda kv: kv[1])),
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _merges_of(bpe_model) -> list[tuple[str, str]]:
    """The trained merges in rank order (tokenizers exposes them only through a saved model)."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        from tokenizers import Tokenizer

        tok = Tokenizer(bpe_model)
        path = Path(tmp) / "t.json"
        tok.save(str(path))
        merges = json.loads(path.read_text())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


TINY_TEXT_ENCODER = dict(
    hidden_size=TEXT_HIDDEN,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
#: Records which recipe built a checkpoint folder, so a changed recipe rebuilds it.
RECIPE_FILE = "tiny-recipe.json"


def recipe() -> str:
    """sha256 of everything that decides the checkpoint's bytes (sizes, seed, corpus, library versions)."""
    import hashlib
    import json
    from importlib import metadata

    parts = {
        "seed": TINY_SEED,
        "transformer": TINY_TRANSFORMER,
        "text_encoder": TINY_TEXT_ENCODER,
        "vae": TINY_VAE,
        "corpus": _CORPUS,
        "special": SPECIAL_TOKENS,
        "template": CHAT_TEMPLATE,
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "transformers", "tokenizers")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()


def build_components(vocab_size: int):
    """Seeded tiny modules of the real classes, in float32 on CPU."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(TINY_SEED)
    text_encoder = Qwen3Model(
        Qwen3Config(vocab_size=vocab_size, pad_token_id=vocab_size - len(SPECIAL_TOKENS), **TINY_TEXT_ENCODER)
    ).eval()

    torch.manual_seed(TINY_SEED + 1)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER).eval()
    with torch.no_grad():
        # The real model learned non-zero pad tokens; random ones make padding bugs visible.
        transformer.x_pad_token.normal_(0.0, 0.5)
        transformer.cap_pad_token.normal_(0.0, 0.5)

    torch.manual_seed(TINY_SEED + 2)
    vae = AutoencoderKL(**TINY_VAE).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return text_encoder, transformer, vae, scheduler


def init_tiny_checkpoint(out_dir: Path, *, force: bool = False) -> Path:
    """Write the tiny checkpoint to ``out_dir`` (atomically: a half-built folder never appears)."""
    import json

    from diffusers import ZImagePipeline

    out_dir = Path(out_dir)
    wanted = recipe()
    if out_dir.exists():
        marker = out_dir / RECIPE_FILE
        current = json.loads(marker.read_text()).get("recipe") if marker.is_file() else None
        if not force and current == wanted and (out_dir / "model_index.json").is_file():
            return out_dir
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    text_encoder, transformer, vae, scheduler = build_components(len(tokenizer))
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / RECIPE_FILE).write_text(json.dumps({"recipe": wanted}) + "\n")
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir
