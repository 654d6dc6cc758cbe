"""Dense causal attention through SDPA: the full-attention kernel and the speed baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.sepllm.info import KeptSet


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Every causal pair, bottom-right aligned: query i of Sq sees keys j <= i + Sk - Sq (the
    queries are the last Sq of the Sk keys, as in a decode step over a full cache)."""
    Sq, Sk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if Sq == Sk:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa
        )
    if Sq > Sk:
        raise ValueError(f"more queries ({Sq}) than keys ({Sk})")
    # SDPA's is_causal is top-left aligned when Sq != Sk: build the bottom-right mask instead.
    mask = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(diagonal=Sk - Sq)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
    )


def causal_kernel(
    q: torch.Tensor,  # [B, H, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Sk, D]
    v: torch.Tensor,  # [B, Hkv, Sk, D]
    *,
    window: int,
    kept: KeptSet | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, Sq, D]
    del window, kept  # full attention: every causal pair is kept
    return causal_attention(q, k, v, dropout_p)
