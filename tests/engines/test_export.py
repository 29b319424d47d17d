"""The export-friendly denoiser computes diffusers' transformer, and so does its ONNX file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zimage_platform.engines.export import DENOISER_TOLERANCE, BatchedDenoiser, pad_captions


def stock(transformer, latents, t, captions):
    rows = list(latents.unsqueeze(2).unbind(0))
    return torch.stack(transformer(rows, t, captions, return_dict=False)[0]).squeeze(2)


@pytest.mark.parametrize(
    ("latent_hw", "caption_lens"),
    [
        ((8, 8), [5]),  # 64²: 16 image tokens padded to 32
        ((16, 16), [31, 32, 33]),  # caption lengths around the 32-token padding boundary
        ((16, 24), [1, 64, 40]),  # non-square bucket
        ((32, 32), [20, 20]),  # equal lengths: diffusers uses no mask at all
    ],
)
def test_batched_denoiser_matches_stock_transformer(torch_engine, latent_hw, caption_lens):
    transformer = torch_engine.pipeline.pipe.transformer
    gen = torch.Generator().manual_seed(len(caption_lens))
    b = len(caption_lens)
    latents = torch.randn(b, 16, *latent_hw, generator=gen)
    t = torch.rand(b, generator=gen)
    captions = [torch.randn(n, transformer.config.cap_feat_dim, generator=gen) for n in caption_lens]
    with torch.inference_mode():
        expected = stock(transformer, latents, t, captions)
        got = BatchedDenoiser(transformer)(latents, t, *pad_captions(captions))
    assert (got - expected).abs().max().item() <= DENOISER_TOLERANCE
    assert expected.abs().max() > 0.1  # not trivially zero


def test_onnx_denoiser_matches_stock_at_every_size_and_batch(ort_engine, torch_engine):
    transformer = torch_engine.pipeline.pipe.transformer
    ort_denoiser = ort_engine.pipeline.denoiser
    gen = torch.Generator().manual_seed(0)
    for hw in [(8, 8), (16, 16), (32, 32), (16, 24), (24, 16)]:
        for lens in ([7], [12, 45, 33]):
            latents = torch.randn(len(lens), 16, *hw, generator=gen)
            t = torch.rand(len(lens), generator=gen)
            captions = [torch.randn(n, transformer.config.cap_feat_dim, generator=gen) for n in lens]
            with torch.inference_mode():
                expected = stock(transformer, latents, t, captions)
            got = ort_denoiser(latents, t, captions)
            assert (got - expected).abs().max().item() <= DENOISER_TOLERANCE, (hw, lens)


def test_onnx_decoder_matches_vae_and_the_stock_postprocess(ort_engine, torch_engine):
    """The exported decoder includes diffusers' uint8 conversion: pixels within one level of torch."""
    pipe = torch_engine.pipeline.pipe
    latents = torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        decoded = pipe.vae.decode(latents, return_dict=False)[0]
    expected = np.stack([np.asarray(i) for i in pipe.image_processor.postprocess(decoded, output_type="pil")])
    got = ort_engine.pipeline.decoder(latents).numpy()
    assert got.dtype == np.uint8 and got.shape == (2, 128, 192, 3)
    assert np.abs(got.astype(np.int16) - expected).max() <= 1
    assert np.array_equal(torch_engine.pipeline.decoder(latents).numpy(), expected)


def test_onnx_export_is_deterministic(config, ort_engine, tmp_path):
    """Engines are built deterministically: exporting again gives the same bytes."""
    from zimage_platform.engines import engine_folder
    from zimage_platform.engines.export import export_decoder_onnx, export_denoiser_onnx
    from zimage_platform.engines.manifest import sha256_file

    pipe = ort_engine.pipeline.pipe
    export_denoiser_onnx(pipe.transformer, tmp_path / "denoiser.onnx")
    export_decoder_onnx(pipe.vae, tmp_path / "vae_decoder.onnx")
    built = engine_folder(config, "turbo", "onnxruntime")
    for name in ("denoiser.onnx", "vae_decoder.onnx"):
        assert sha256_file(tmp_path / name) == sha256_file(built / name), name
