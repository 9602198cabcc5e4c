"""Rotary position embedding, computed the way HF transformers computes it (fp32, half-split).

HF checkpoints store Q/K rows in "half-split" order (rotate_half), so we use that layout;
GGUF's interleaved order is undone at import time.
"""

from __future__ import annotations

import math

import torch

from edgemesh.weights.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
    sc = config.rope_scaling
    if sc.rope_type == "linear":
        return inv / sc.factor
    if sc.rope_type == "llama3":
        # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
        old = sc.original_max_position_embeddings
        low_wavelen = old / sc.low_freq_factor
        high_wavelen = old / sc.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / sc.factor, inv)
        smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
        smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_table(config: ModelConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq_len, head_dim] (fp32)."""
    inv = inv_frequencies(config)
    pos = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, d]; cos/sin: [T, d]."""
    return (x * cos.to(x.dtype)) + (_rotate_half(x) * sin.to(x.dtype))
