"""Reference SepLLM kernel: an explicit boolean Sq x Sk kept mask through SDPA.

Exact and simple, O(Sq * Sk) memory; the baseline the fast kernels are tested and timed
against, and the one kernel for every layout: any Sq <= Sk, keys and queries at any text
positions (a decode step over a compacted cache), and kept=None (full causal attention,
bottom-right aligned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.sepllm.info import KeptSet, dense_keep_mask
from megatron.sepllm.kernels.causal import causal_attention


def dense_kernel(
    q: torch.Tensor,  # [B, H, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    *,
    window: int,
    kept: KeptSet | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, Sq, D]
    if kept is None:  # full attention
        return causal_attention(q, k, v, dropout_p)
    if (kept.q_len, kept.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(
            f"kept set is for {kept.q_len} queries x {kept.kv_len} keys, got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    gqa = k.shape[1] != q.shape[1]
    # The mask is the same for every layer with this window: build it once per batch.
    mask = kept.window_cache(
        ("dense", window, q.device), lambda: dense_keep_mask(kept, window)[:, None].to(q.device)
    )  # [B, 1, Sq, Sk] bool
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
    )
