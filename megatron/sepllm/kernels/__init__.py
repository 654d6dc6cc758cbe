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
  triton   one fused Triton kernel per query block over the gathered far keys (initial +
           separators, a per-row index list whose validity is a staircase) and the banded
           window, online softmax, FlashAttention-2 style backward (kernels/triton_sep.py);
           fp32 / bf16 / fp16, GQA, head dim <= 256; aligned layout only, no dropout; CUDA,
           or CPU under TRITON_INTERPRET=1 (the tests); imported on first use
  sa, sa_no_deno  Self-Adjust softmax (kernels/sa_softmax.py): a different attention
           function, not a faster one, so only an explicit request runs it, over any kept set
           and layout; `get_kernel(name, sep)` binds the section's biases
`select_kernel` is the one place that decides which kernel runs a layer; kernels never hand
a call to another kernel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Protocol

import torch

from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels.causal import causal_kernel
from megatron.sepllm.kernels.compact import compact_kernel
from megatron.sepllm.kernels.dense import dense_kernel
from megatron.sepllm.kernels.sa_softmax import SA_KERNELS, sa_kernel


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


def _load_triton() -> AttentionKernel:
    """kernels/triton_sep.py's kernel (a lazy import: Triton is optional and slow to import)."""
    from megatron.sepllm.kernels.triton_sep import triton_kernel

    return triton_kernel


def triton_available(device_type: str) -> bool:
    """Whether the triton kernel can run on `device_type`: Triton imports and the device is
    CUDA, or TRITON_INTERPRET=1 runs it in the CPU interpreter (the tests)."""
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return _triton_imports()


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _lazy_entry(load: Callable[[], AttentionKernel]) -> AttentionKernel:
    """A registry entry that imports its kernel's module on the first call (the kernel itself
    refuses devices it cannot run on)."""

    def entry(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        window: int,
        kept: KeptSet | None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        return load()(q, k, v, window=window, kept=kept, dropout_p=dropout_p)

    return entry


KERNELS: dict[str, AttentionKernel] = {
    "causal": causal_kernel,
    "dense": dense_kernel,
    "compact": compact_kernel,
    "flex": _lazy_entry(_load_flex),
    "triton": _lazy_entry(_load_triton),
    **{name: sa_kernel(name) for name in SA_KERNELS},  # the original's default biases
}
AUTO = "auto"  # not a kernel: asks select_kernel for the fastest measured one


def get_kernel(name: str, sep: SepLLMConfig | None = None) -> AttentionKernel:
    """The kernel registered as `name` ('auto' is resolved by `select_kernel`, not here);
    the Self-Adjust softmax kernels take their biases from `sep` when given."""
    if name in SA_KERNELS:
        return sa_kernel(name, sep)
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; available: {sorted(KERNELS)}")
    if name == "flex":
        if not flex_available():
            raise ValueError("attention kernel 'flex' needs torch.nn.attention.flex_attention")
        return _load_flex()
    if name == "triton":
        if not _triton_imports():
            raise ValueError("attention kernel 'triton' needs the triton package")
        return _load_triton()
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
# `auto` on CUDA picks the triton kernel from this sequence length on; None: never. UNMEASURED:
# no GPU was lent when the kernel was written, so auto keeps the measured flex / compact rules
# until `python benchmarks/sepllm_attention.py --device cuda --dtype bfloat16 --batch 4
# --heads 16 --head-dim 128 --windows 64 --seq 2048 4096 8192 16384 --triton` (which checks
# the kernel against an fp64 reference first) shows where it beats them; set it from that
# table and cite it here. Explicit `attention_kernel: triton` runs it at any length.
AUTO_CUDA_TRITON_MIN_SEQ: int | None = None
# The triton kernel holds one [block, head dim] tile per operand in registers.
TRITON_MAX_HEAD_DIM = 256
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
    triton_available: bool,
    mode: str,
    aligned: bool = True,
) -> str:
    """Name of the kernel that runs one layer (a key of KERNELS); pure.

    requested      sepllm.attention_kernel: 'auto' or a KERNELS name
    device_type    'cpu', 'cuda', ...
    q_len, kv_len  queries and keys of the call (equal in the aligned training layout)
    window, head_dim, dropout_p   the layer's window, head dim and attention dropout
    flex_available whether FlexAttention imports (`flex_available()`)
    triton_available  whether the triton kernel can run on this device
                   (`triton_available(device_type)`)
    mode           sepllm.mode ('full' has no kept set)
    aligned        the kept set's layout is the training one (KeptSet.aligned)

    Rules, in order: a Self-Adjust softmax kernel (SA_KERNELS) is honoured everywhere (it
    changes what attention computes); full mode or a window covering the sequence -> causal;
    an explicit request for flex / triton that cannot run here raises; an explicit causal /
    dense request is honoured; unaligned kept sets (decode) -> dense, the only kernel that reads
    positions;
    auto -> dense on non-CUDA devices up to AUTO_DENSE_MAX_SEQ, triton on CUDA from
    AUTO_CUDA_TRITON_MIN_SEQ (None: never, unmeasured), flex on CUDA below
    AUTO_CUDA_COMPACT_MIN_SEQ when importable, else compact; triton with dropout -> dense,
    with a head dim above TRITON_MAX_HEAD_DIM -> compact; flex with dropout -> dense, flex on
    CUDA with a head dim below FLEX_MIN_HEAD_DIM -> compact; compact with dropout or with
    S <= 4 w and S <= DENSE_MAX_SEQ -> dense.
    """
    if aligned and q_len != kv_len:
        raise ValueError(f"an aligned kept set has q_len == kv_len, got {q_len} and {kv_len}")
    if requested in SA_KERNELS:  # another attention function: never swapped for a faster one
        return requested
    if mode == "full" or (aligned and window >= kv_len):  # every causal pair is kept
        return "causal"
    if requested not in (AUTO, *KERNELS):
        raise ValueError(
            f"unknown attention kernel {requested!r}; available: {sorted([*KERNELS, AUTO])}"
        )
    if requested == "flex" and not flex_available:
        raise ValueError("attention kernel 'flex' needs torch.nn.attention.flex_attention")
    if requested == "triton" and not triton_available:
        raise ValueError(
            f"attention kernel 'triton' cannot run on {device_type!r}: it needs the triton "
            "package and a CUDA device (on CPU only under TRITON_INTERPRET=1, the tests); "
            "use 'auto' or 'compact'"
        )
    if requested in ("causal", "dense"):
        return requested
    if not aligned:  # a decode step: keys at arbitrary text positions
        return "dense"
    name = requested
    if name == AUTO:
        if device_type != "cuda" and kv_len <= AUTO_DENSE_MAX_SEQ:
            return "dense"
        name = _auto_cuda(device_type, kv_len, head_dim, flex_available, triton_available)
    if name == "triton":
        if dropout_p > 0.0:  # no dropout in the fused kernel: exact reference instead
            return "dense"
        if head_dim <= TRITON_MAX_HEAD_DIM:
            return "triton"
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


def _auto_cuda(device_type: str, kv_len: int, head_dim: int, flex: bool, triton: bool) -> str:
    """auto past the CPU dense rule: triton (only once AUTO_CUDA_TRITON_MIN_SEQ is measured),
    flex below AUTO_CUDA_COMPACT_MIN_SEQ, else compact; everything but CUDA -> compact."""
    if device_type != "cuda":
        return "compact"
    gate = AUTO_CUDA_TRITON_MIN_SEQ
    if triton and gate is not None and kv_len >= gate and head_dim <= TRITON_MAX_HEAD_DIM:
        return "triton"
    if kv_len < AUTO_CUDA_COMPACT_MIN_SEQ and flex:
        return "flex"
    return "compact"
