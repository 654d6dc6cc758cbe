"""The pure PyTorch reference ops: the model's own eager code, always available.

`megatron.model.rotary.apply_rotary` and `megatron.model.norms.RMSNorm` call these functions, so
the reference *is* the model's default path (bit-identical with fusion off) and every fused
implementation is tested against exactly what the model computes without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., N]
    # Normalise in fp32 as Llama does, then cast back: bf16 variance loses precision.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:  # [..., N]; what nn.LayerNorm.forward computes
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
