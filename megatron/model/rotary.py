"""Rotary position embedding (rotate-half convention, as GPT-NeoX and Llama in transformers).

Partial rotary (NeoX ``rotary_pct``) rotates only the first ``rot_dim`` dims of each head.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron import fused_kernels


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


def apply_rotary(
    x: torch.Tensor,  # [B, H, S, D]
    cos: torch.Tensor,  # [S, R] or [B, S, R]
    sin: torch.Tensor,
    fusion: bool = False,
) -> torch.Tensor:  # [B, H, S, D], a view of [B, S, H, D] storage
    # The eager code lives in fused_kernels.reference so fused kernels are tested against
    # exactly this path; `fusion` (config `rope_fusion`) lets the dispatch pick a kernel.
    if fusion:
        return fused_kernels.rope(x, cos, sin)
    return fused_kernels.reference.rope(x, cos, sin)
