"""Rotary position embedding (rotate-half convention, as GPT-NeoX and Llama in transformers).

Partial rotary (NeoX ``rotary_pct``) rotates only the first ``rot_dim`` dims of each head.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, rot_dim: int, base: float, max_positions: int) -> None:
        super().__init__()
        self.rot_dim = rot_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = max_positions

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # positions [S] or [B, S] -> cos/sin [.., S, rot_dim]
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: torch.Tensor,  # [B, H, S, D]
    cos: torch.Tensor,  # [S, R] or [B, S, R]
    sin: torch.Tensor,
) -> torch.Tensor:  # [B, H, S, D], a view of [B, S, H, D] storage
    # Computed in [B, S, H, D] order: the projections produce that layout and the attention
    # kernels (CPU flash op, compact kernel) read it without a copy.
    rot = cos.shape[-1]
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads: [.., S, 1, R]
    xs = x.transpose(1, 2)
    x_rot, x_pass = xs[..., :rot], xs[..., rot:]
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    out = torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot
    return out.transpose(1, 2)
