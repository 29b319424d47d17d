"""Export-friendly Z-Image denoiser and VAE decoder, and their ONNX export.

diffusers' ``ZImageTransformer2DModel.forward`` does not export: it takes Python lists, loops
per sample to patchify and pad, and applies RoPE with complex numbers. ``BatchedDenoiser``
computes the same function over the *same modules and weights* with tensors only:

- latents ``[B,16,h,w]`` are patchified with ``unflatten``/``permute`` (no frozen reshapes);
- captions come padded to one length ``[B,L,D]`` with their true lengths ``[B]``; the graph
  rebuilds diffusers' per-sample padding (pad tokens up to a multiple of 32, which attend) and
  batch padding (masked with an additive float mask);
- RoPE is real-valued: cos/sin tables (diffusers' own frequencies) gathered by position id.

It matches the stock transformer within ``DENOISER_TOLERANCE`` (tested), and its ONNX export
keeps batch and caption length dynamic (exported with an example batch of 2: torch.export
specialises size-1 dimensions).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, RopeEmbedder
from torch import nn

from zimage_platform.pipeline.pipeline import to_uint8

#: Max |difference| between BatchedDenoiser and the stock transformer on the tiny checkpoint
#: (float32; both are the same arithmetic in a different order).
DENOISER_TOLERANCE = 1e-4
ONNX_OPSET = 23
#: Export-time bounds of the dynamic axes. Generous and fixed, so the ONNX file depends only
#: on the checkpoint and tools (TensorRT narrows them per bucket with optimisation profiles).
EXPORT_MAX_BATCH = 64
EXPORT_MAX_CAPTION = 1024
EXPORT_MAX_LATENT_SIDE = 256
#: Masked attention logits: finite (TensorRT and fp16 friendly) yet exp() underflows to 0.
_MASKED = -30000.0


def _round_up(n: torch.Tensor | int, multiple: int = SEQ_MULTI_OF):
    return (n + multiple - 1) // multiple * multiple


class BatchedDenoiser(nn.Module):
    """Tensor-only forward over a ``ZImageTransformer2DModel``'s modules (any bucket, any batch)."""

    def __init__(self, transformer, patch: int = 2) -> None:
        super().__init__()
        cfg = transformer.config
        if tuple(cfg.all_patch_size) != (patch,) or tuple(cfg.all_f_patch_size) != (1,):
            raise ValueError("BatchedDenoiser supports the image model's single 2x2 patch size")
        self.t = transformer
        self.patch = patch
        self.key = f"{patch}-1"
        # RoPE tables from diffusers' own frequencies, built eagerly (never during export).
        tables = RopeEmbedder.precompute_freqs_cis(list(cfg.axes_dims), list(cfg.axes_lens), theta=cfg.rope_theta)
        for axis, table in enumerate(tables):
            self.register_buffer(f"cos{axis}", table.real.contiguous().float(), persistent=False)
            self.register_buffer(f"sin{axis}", table.imag.contiguous().float(), persistent=False)

    # -- helpers ------------------------------------------------------------------------

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B,S,1,head_dim/2]`` for integer positions ``[B,S,3]``."""
        cos = torch.cat([self.cos0[pos[..., 0]], self.cos1[pos[..., 1]], self.cos2[pos[..., 2]]], dim=-1)
        sin = torch.cat([self.sin0[pos[..., 0]], self.sin1[pos[..., 1]], self.sin2[pos[..., 2]]], dim=-1)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return rotated.flatten(-2).type_as(x)

    def _attention(self, attn, x: torch.Tensor, mask: torch.Tensor | None, cos, sin) -> torch.Tensor:
        q = attn.to_q(x).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(x).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(x).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k = self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)
        if mask is not None:
            # ONNX Attention (opset 23) wants the mask's query axis spelled out, not broadcast.
            mask = mask.expand(-1, -1, x.shape[1], -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return attn.to_out[0](out.transpose(1, 2).flatten(2))

    def _block(self, block, x, mask, cos, sin, adaln: torch.Tensor | None) -> torch.Tensor:
        if block.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
            attn_out = self._attention(block.attention, block.attention_norm1(x) * scale_msa, mask, cos, sin)
            x = x + gate_msa * block.attention_norm2(attn_out)
            return x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * scale_mlp))
        attn_out = self._attention(block.attention, block.attention_norm1(x), mask, cos, sin)
        x = x + block.attention_norm2(attn_out)
        return x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))

    # -- forward ------------------------------------------------------------------------

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, captions: torch.Tensor, caption_lens: torch.Tensor
    ) -> torch.Tensor:
        t = self.t
        batch = latents.shape[0]
        h_tokens, w_tokens = latents.shape[2] // self.patch, latents.shape[3] // self.patch
        hw = h_tokens * w_tokens
        x_len = _round_up(hw)
        cap_len = captions.shape[1]
        # Each caption is padded (with the learned pad token) to a multiple of 32; those pads attend.
        cap_padded = _round_up(caption_lens)

        adaln = t.t_embedder(timestep * t.t_scale).type_as(latents)

        # Image tokens: patchify [B,C,H,W] → [B, h*w, 2*2*C], embed, pad to a multiple of 32.
        patches = latents.unflatten(2, (h_tokens, self.patch)).unflatten(4, (w_tokens, self.patch))
        patches = patches.permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        x = t.all_x_embedder[self.key](patches)
        x = torch.cat([x, t.x_pad_token.expand(batch, x_len - hw, -1).type_as(x)], dim=1)

        # Positions: captions at (1+k, 0, 0); the image at (caption_padded_len + 1, row, col).
        cap_pos = torch.arange(cap_len, device=latents.device) + 1
        cap_pos = torch.stack([cap_pos, torch.zeros_like(cap_pos), torch.zeros_like(cap_pos)], dim=-1)
        cap_pos = cap_pos.unsqueeze(0).expand(batch, -1, -1)
        rows = torch.arange(h_tokens, device=latents.device).unsqueeze(1).expand(-1, w_tokens).flatten()
        cols = torch.arange(w_tokens, device=latents.device).unsqueeze(0).expand(h_tokens, -1).flatten()
        img_pos = torch.stack(
            [
                (cap_padded + 1).unsqueeze(1).expand(-1, hw),
                rows.unsqueeze(0).expand(batch, -1),
                cols.unsqueeze(0).expand(batch, -1),
            ],
            dim=-1,
        )
        # The image's own pad tokens sit at position (0, 0, 0), as in diffusers.
        img_pos = torch.cat([img_pos, img_pos.new_zeros(batch, x_len - hw, 3)], dim=1)
        x_cos, x_sin = self._rope(img_pos)
        c_cos, c_sin = self._rope(cap_pos)

        for layer in t.noise_refiner:
            x = self._block(layer, x, None, x_cos, x_sin, adaln)

        # Caption tokens: embed, replace everything past the true length with the pad token.
        cap = t.cap_embedder(captions)
        k = torch.arange(cap_len, device=latents.device).unsqueeze(0)
        is_pad = (k >= caption_lens.unsqueeze(1)).unsqueeze(-1)
        cap = torch.where(is_pad, t.cap_pad_token.type_as(cap), cap)
        cap_keep = k < cap_padded.unsqueeze(1)
        cap_mask = torch.where(cap_keep, 0.0, _MASKED).to(cap.dtype)[:, None, None, :]
        for layer in t.context_refiner:
            cap = self._block(layer, cap, cap_mask, c_cos, c_sin, None)

        # Joint sequence [image, caption]; batch padding past each caption's padded length is masked.
        unified = torch.cat([x, cap], dim=1)
        keep = torch.cat([torch.ones(batch, x_len, dtype=torch.bool, device=latents.device), cap_keep], dim=1)
        mask = torch.where(keep, 0.0, _MASKED).to(unified.dtype)[:, None, None, :]
        cos, sin = torch.cat([x_cos, c_cos], dim=1), torch.cat([x_sin, c_sin], dim=1)
        for layer in t.layers:
            unified = self._block(layer, unified, mask, cos, sin, adaln)
        out = t.all_final_layer[self.key](unified, c=adaln)[:, :hw]

        # Unpatchify [B, h*w, 2*2*C] → [B, C, H, W].
        channels = t.out_channels
        out = out.unflatten(1, (h_tokens, w_tokens)).unflatten(-1, (self.patch, self.patch, channels))
        return out.permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)


class VaeDecoderModule(nn.Module):
    """``vae.decode`` plus the conversion to 8-bit ``[B,H,W,3]`` pixels, as one graph: the
    float image never leaves the runtime (and no framework thread pool is woken for it)."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.vae.decode(latents, return_dict=False)[0])


def pad_captions(captions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length captions into ``[B, L, D]`` (L a multiple of 32) and their lengths."""
    lens = torch.tensor([c.shape[0] for c in captions], dtype=torch.long)
    length = int(_round_up(int(lens.max())))
    out = captions[0].new_zeros(len(captions), length, captions[0].shape[1])
    for i, c in enumerate(captions):
        out[i, : c.shape[0]] = c
    return out, lens


def _dims() -> tuple:
    """Batch, and latent height/width as multiples of the 2x2 patch (so tokens stay whole)."""
    batch = torch.export.Dim("batch", min=1, max=EXPORT_MAX_BATCH)
    half_h = torch.export.Dim("latent_h_half", min=2, max=EXPORT_MAX_LATENT_SIDE // 2)
    half_w = torch.export.Dim("latent_w_half", min=2, max=EXPORT_MAX_LATENT_SIDE // 2)
    return batch, 2 * half_h, 2 * half_w


def export_denoiser_onnx(transformer, out: Path) -> None:
    """Export the denoiser once for every bucket: batch, caption length and size are dynamic."""
    module = BatchedDenoiser(transformer).eval()
    in_channels = transformer.config.in_channels
    cap_dim = transformer.config.cap_feat_dim
    # Distinct example sizes so no two dynamic dimensions are unified by accident.
    example = (
        torch.randn(2, in_channels, 12, 20),
        torch.tensor([0.25, 0.75]),
        torch.randn(2, 64, cap_dim),
        torch.tensor([40, 17]),
    )
    batch, height, width = _dims()
    caption = torch.export.Dim("caption", min=2, max=EXPORT_MAX_CAPTION)
    _export(
        module,
        example,
        out,
        input_names=["latents", "timestep", "captions", "caption_lens"],
        output_names=["velocity"],
        dynamic_shapes={
            "latents": {0: batch, 2: height, 3: width},
            "timestep": {0: batch},
            "captions": {0: batch, 1: caption},
            "caption_lens": {0: batch},
        },
    )


def export_decoder_onnx(vae, out: Path) -> None:
    module = VaeDecoderModule(vae).eval()
    example = (torch.randn(2, vae.config.latent_channels, 12, 20),)
    batch, height, width = _dims()
    _export(
        module,
        example,
        out,
        input_names=["latents"],
        output_names=["images"],
        dynamic_shapes={"latents": {0: batch, 2: height, 3: width}},
    )


def _export(module, example, out: Path, *, input_names, output_names, dynamic_shapes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Protobuf caps a single file at 2 GB: real-size weights go to an external data file.
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > 1_800_000_000
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=ONNX_OPSET,
            external_data=external,
            optimize=True,
            verbose=False,
        )
        program.save(str(out), external_data=external)
    _strip_export_metadata(out)


def _strip_export_metadata(path: Path) -> None:
    """Drop the exporter's debug metadata so the same model always gives the same bytes: the
    graph's range constraints print a set in hash order, and node stack traces name
    per-process counters (``<eval_with_key>.N``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    del model.graph.metadata_props[:]
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        del node.metadata_props[:]
    path.write_bytes(model.SerializeToString(deterministic=True))
