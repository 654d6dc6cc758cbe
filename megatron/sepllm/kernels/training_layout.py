"""The call checks shared by the kernels that serve only the aligned training layout
(compact, flex, triton): `select_kernel` routes every other call to causal / dense, so a call
that reaches one of them otherwise is a routing bug and gets a message that says where to go."""

from __future__ import annotations

import torch

from megatron.sepllm.info import KeptSet


def require_training_layout(
    kernel: str,
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    kept: KeptSet | None,
    dropout_p: float,
    why_no_dropout: str = "no attention dropout",
) -> KeptSet:
    """`kept` when this is the aligned training layout without dropout; raises otherwise."""
    S = q.shape[2]
    if kept is None or not kept.aligned or kept.kv_len != S or k.shape[2] != S:
        raise ValueError(
            f"{kernel} kernel: needs the aligned kept set of this batch (training layout); "
            "full attention and decode steps go to the causal / dense kernels"
        )
    if dropout_p > 0.0:
        raise ValueError(f"{kernel} kernel: {why_no_dropout}; the dense kernel has it")
    return kept


def require_window(window: int) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
