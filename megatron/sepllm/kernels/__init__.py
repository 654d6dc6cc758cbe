"""Registry of inner attention kernels.

Every kernel has the signature
    kernel(q [B,H,S,D], k [B,Hkv,S,D], v [B,Hkv,S,D], *, window: int, info, dropout_p=0.0)
        -> out [B,H,S,D]
where `info` is the per-batch SepLLM description (None for full attention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron.sepllm.kernels.causal import causal_kernel

AttentionKernel = Callable[..., torch.Tensor]

KERNELS: dict[str, AttentionKernel] = {"causal": causal_kernel}


def get_kernel(name: str, device: torch.device | None = None) -> AttentionKernel:
    """Return the kernel called `name`; 'auto' picks the fastest one available on `device`."""
    if name == "auto":
        name = "causal"
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; available: {sorted(KERNELS)}")
    return KERNELS[name]
