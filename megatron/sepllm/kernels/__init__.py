"""Inner attention kernels: one typed contract, one registry, one selection function.

Contract (`AttentionKernel`):
    kernel(q [B,H,Sq,D], k [B,Hkv,Sk,D], v [B,Hkv,Sk,D], *, window: int,
           kept: KeptSet | None, dropout_p: float = 0.0) -> out [B,H,Sq,D]
`kept` (megatron.sepllm.info.KeptSet) describes the keys and the queries by text position;
None means full causal attention, bottom-right aligned (query i of Sq sees the first
i + Sk - Sq + 1 keys). Hkv divides H (grouped-query attention). Kernels (`KERNELS`, the only
list of names):
  causal   SDPA over every causal pair (full attention; ignores window / kept); any Sq <= Sk
  dense    boolean Sq x Sk kept mask + SDPA: the exact reference and the one kernel for every
           layout (decode steps over a compacted cache, dropout, kept=None)
  compact  block-local window + compact separators merged by log-sum-exp; no S x S tensor;
           forward and backward; aligned training layout only, no dropout
  flex     FlexAttention with a mask_mod over separator positions (block mask cached per
           window on the KeptSet); aligned layout only, no dropout; CUDA for training (no CPU
           backward); imported on first use
`select_kernel` is the one place that decides which kernel runs a layer; kernels never hand
a call to another kernel.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels.causal import causal_kernel
from megatron.sepllm.kernels.compact import compact_kernel
from megatron.sepllm.kernels.dense import dense_kernel


class AttentionKernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # [B, H, Sq, D]
        k: torch.Tensor,  # [B, Hkv, Sk, D]
        v: torch.Tensor,  # [B, Hkv, Sk, D]
        *,
        window: int,
        kept: KeptSet | None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor: ...  # [B, H, Sq, D]


def _load_flex() -> AttentionKernel:
    """kernels/flex.py's kernel (a lazy import: torch builds without FlexAttention fail it)."""
    from megatron.sepllm.kernels.flex import flex_kernel

    return flex_kernel


@functools.cache
def flex_available() -> bool:
    """Whether this torch has FlexAttention (so the flex kernel can run)."""
    try:
        _load_flex()
    except ImportError:
        return False
    return True


def _flex_entry(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    kept: KeptSet | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Registry entry of the flex kernel: imports kernels/flex.py on the first call."""
    return _load_flex()(q, k, v, window=window, kept=kept, dropout_p=dropout_p)


KERNELS: dict[str, AttentionKernel] = {
    "causal": causal_kernel,
    "dense": dense_kernel,
    "compact": compact_kernel,
    "flex": _flex_entry,
}
AUTO = "auto"  # not a kernel: asks select_kernel for the fastest measured one


def get_kernel(name: str) -> AttentionKernel:
    """The kernel registered as `name` ('auto' is resolved by `select_kernel`, not here)."""
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; available: {sorted(KERNELS)}")
    if name == "flex":
        if not flex_available():
            raise ValueError("attention kernel 'flex' needs torch.nn.attention.flex_attention")
        return _load_flex()
    return KERNELS[name]


# Below this sequence length `auto` uses the dense-mask kernel on CPU: the S x S mask is small
# and one SDPA call beats the compact kernel's several small flash calls (measured at B=16,
# H=4, D=64, w=16: S=128 dense 7.2 ms vs compact 15.5 ms fwd+bwd; at B=1, H=8, S=1024, w=64
# compact is already faster, 22 vs 32 ms - docs/benchmarks.md).
AUTO_DENSE_MAX_SEQ = 512
# On CUDA flex wins below this length and compact from here on (H100, bf16, B=4, H=16,
# D=128, w=64, fwd+bwd: S=4096 flex 4.6 vs compact 8.3 ms; S=8192 15.2 vs 14.9;
# S=16384 56.4 vs 43.7 - docs/benchmarks.md).
AUTO_CUDA_COMPACT_MIN_SEQ = 8192
# Short sequences relative to the window (S <= 4 w, and small enough for an S x S mask) go from
# compact to the dense-mask kernel: the window part would compute nearly all causal pairs
# anyway, and one masked SDPA call beats the two-part split (measured: S=1024, w=256 compact
# 0.87x the mask reference).
DENSE_BELOW_WINDOW_RATIO = 4
DENSE_MAX_SEQ = 4096
# Compiled flex rejects small heads: "NYI: embedding dimension ... must be at least 16"
# (torch 2.11); such layers go to compact.
FLEX_MIN_HEAD_DIM = 16


def select_kernel(
    requested: str,
    *,
    device_type: str,
    q_len: int,
    kv_len: int,
    window: int,
    head_dim: int,
    dropout_p: float,
    flex_available: bool,
    mode: str,
    aligned: bool = True,
) -> str:
    """Name of the kernel that runs one layer (a key of KERNELS); pure.

    requested      sepllm.attention_kernel: 'auto' or a KERNELS name
    device_type    'cpu', 'cuda', ...
    q_len, kv_len  queries and keys of the call (equal in the aligned training layout)
    window, head_dim, dropout_p   the layer's window, head dim and attention dropout
    flex_available whether FlexAttention imports (`flex_available()`)
    mode           sepllm.mode ('full' has no kept set)
    aligned        the kept set's layout is the training one (KeptSet.aligned)

    Rules, in order: full mode or a window covering the sequence -> causal; an explicit
    causal / dense request is honoured; unaligned kept sets (decode) -> dense, the only
    kernel that reads positions; auto -> dense on non-CUDA devices up to AUTO_DENSE_MAX_SEQ,
    flex on CUDA below AUTO_CUDA_COMPACT_MIN_SEQ when importable, else compact; flex with
    dropout -> dense, flex on CUDA with a head dim below FLEX_MIN_HEAD_DIM -> compact;
    compact with dropout or with S <= 4 w and S <= DENSE_MAX_SEQ -> dense.
    """
    if aligned and q_len != kv_len:
        raise ValueError(f"an aligned kept set has q_len == kv_len, got {q_len} and {kv_len}")
    if mode == "full" or (aligned and window >= kv_len):  # every causal pair is kept
        return "causal"
    if requested not in (AUTO, *KERNELS):
        raise ValueError(
            f"unknown attention kernel {requested!r}; available: {sorted([*KERNELS, AUTO])}"
        )
    if requested == "flex" and not flex_available:
        raise ValueError("attention kernel 'flex' needs torch.nn.attention.flex_attention")
    if requested in ("causal", "dense"):
        return requested
    if not aligned:  # a decode step: keys at arbitrary text positions
        return "dense"
    name = requested
    if name == AUTO:
        if device_type != "cuda" and kv_len <= AUTO_DENSE_MAX_SEQ:
            return "dense"
        if device_type == "cuda" and kv_len < AUTO_CUDA_COMPACT_MIN_SEQ and flex_available:
            name = "flex"
        else:
            name = "compact"
    if name == "flex":
        if dropout_p > 0.0:  # flex_attention has no dropout: exact reference instead
            return "dense"
        if device_type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM:
            name = "compact"
        else:
            return "flex"
    # compact
    if dropout_p > 0.0:  # attention-probability dropout needs the full probability tiles
        return "dense"
    if kv_len <= DENSE_BELOW_WINDOW_RATIO * window and kv_len <= DENSE_MAX_SEQ:
        return "dense"
    return "compact"
