"""Reference SepLLM kernel: an explicit boolean S x S kept mask through SDPA.

Exact and simple, O(S^2) memory; the baseline the fast kernels are tested and timed against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.sepllm.info import SepInfo, dense_keep_mask
from megatron.sepllm.kernels.causal import causal_kernel


def dense_kernel(
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    *,
    window: int,
    info: SepInfo | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, S, D]
    gqa = k.shape[1] != q.shape[1]
    S = q.shape[2]
    if info is None or window >= S:  # every causal pair is kept
        return causal_kernel(q, k, v, window=window, info=None, dropout_p=dropout_p)
    # The mask is the same for every layer with this window: build it once per batch.
    mask = info.window_cache(
        ("dense", window, q.device), lambda: dense_keep_mask(info, window)[:, None].to(q.device)
    )  # [B, 1, S, S] bool
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
    )
