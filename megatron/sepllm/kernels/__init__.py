"""Registry of inner attention kernels.

Every kernel has the signature
    kernel(q [B,H,S,D], k [B,Hkv,S,D], v [B,Hkv,S,D], *, window: int, info, dropout_p=0.0)
        -> out [B,H,S,D]
where `info` is the per-batch SepLLM description (megatron.sepllm.info.SepInfo; None for full
attention). Kernels:
  causal   dense causal SDPA (full attention; ignores window / info)
  dense    boolean S x S kept mask + SDPA: the exact reference
  compact  block-local window + compact separators merged by log-sum-exp; no S x S tensor;
           forward and backward; default on CPU and fallback on GPU
  flex     FlexAttention with a mask_mod over separator positions (block mask cached per
           window on the SepInfo); CUDA for training (no CPU backward)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron.sepllm.kernels.causal import causal_kernel
from megatron.sepllm.kernels.compact import compact_kernel
from megatron.sepllm.kernels.dense import dense_kernel

AttentionKernel = Callable[..., torch.Tensor]

KERNELS: dict[str, AttentionKernel] = {
    "causal": causal_kernel,
    "dense": dense_kernel,
    "compact": compact_kernel,
}


def _flex() -> AttentionKernel | None:
    """The flex kernel, or None where torch lacks FlexAttention (imported lazily: it is slow)."""
    try:
        from megatron.sepllm.kernels.flex import flex_kernel
    except ImportError:
        return None
    return flex_kernel


# Below this sequence length `auto` uses the dense-mask kernel on CPU: the S x S mask is small
# and one SDPA call beats the compact kernel's several small flash calls (measured at B=16,
# H=4, D=64, w=16: S=128 dense 7.2 ms vs compact 15.5 ms fwd+bwd; at B=1, H=8, S=1024, w=64
# compact is already faster, 22 vs 32 ms - docs/benchmarks.md).
AUTO_DENSE_MAX_SEQ = 512
# On CUDA flex wins below this length and compact from here on (H100, bf16, B=4, H=16,
# D=128, w=64, fwd+bwd: S=4096 flex 4.6 vs compact 8.3 ms; S=8192 15.2 vs 14.9;
# S=16384 56.4 vs 43.7 - docs/benchmarks.md).
AUTO_CUDA_COMPACT_MIN_SEQ = 8192


def get_kernel(
    name: str, device: torch.device | str | None = None, seq_len: int | None = None
) -> AttentionKernel:
    """Return the kernel called `name`; 'auto' picks the fastest one measured on `device`:
    on CUDA flex (when importable) below AUTO_CUDA_COMPACT_MIN_SEQ, else compact; on CPU
    dense up to AUTO_DENSE_MAX_SEQ, else compact."""
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type != "cuda" and seq_len is not None and seq_len <= AUTO_DENSE_MAX_SEQ:
            return dense_kernel
        long_seq = seq_len is not None and seq_len >= AUTO_CUDA_COMPACT_MIN_SEQ
        if dev.type == "cuda" and not long_seq:
            flex = _flex()
            if flex is not None:
                return flex
        return compact_kernel
    if name == "flex":
        flex = _flex()
        if flex is None:
            raise ValueError("attention kernel 'flex' needs torch.nn.attention.flex_attention")
        return flex
    if name not in KERNELS:
        names = sorted([*KERNELS, "flex", "auto"])
        raise ValueError(f"unknown attention kernel {name!r}; available: {names}")
    return KERNELS[name]
