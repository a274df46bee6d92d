"""Rotary position embeddings (RoPE) with the `linear` and `llama3` frequency scalings.

Matches transformers' `LlamaRotaryEmbedding` in the "rotate half" layout: the head dimension is split into two
halves, not interleaved pairs (HF checkpoints permute q/k weights at conversion time so that this holds).
"""

from __future__ import annotations

import math

import torch

from .config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32 for `config`, scaled per `config.rope_scaling`."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low frequencies by `factor`, blend linearly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, signed_sin: (B, T, head_dim) in `dtype` for position_ids (B, T); angles computed in float32.

    signed_sin is sin with its first half negated, so that `apply_rope` rotates with one `roll` instead of a
    negate and a concatenation; the products are bitwise those of HF's `rotate_half(x) * sin`.
    """
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-freqs, freqs), dim=-1).sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/signed_sin (B, T, D) from `rope_cos_sin`, in the rotate-half layout."""
    return x * cos.unsqueeze(1) + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin.unsqueeze(1)
