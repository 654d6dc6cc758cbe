"""FlexAttention SepLLM kernel: a mask_mod reading the per-row separator flags (CUDA path).

The mask_mod evaluates the kept-set definition from [B, S] tensors (separator flags, initial
range start), so no S x S mask exists; the block mask (which 128 x 128 tiles have any kept
pair) is built once per batch and window and cached on the KeptSet, shared by all layers.
On CUDA flex_attention is compiled (fused forward and backward). On CPU it runs eagerly,
forward only in practice (the eager path is a dense reference, and there is no CPU backward
kernel); it is tested there against the dense reference.

Known limit (as in the paper): with separators in nearly every 128-token tile almost no tile
can be skipped, so the speed-up over causal attention is small; the compact kernel's cost
follows the kept pairs instead.

Contract: the aligned training layout only (query and key indices are text positions), no
dropout, and on CUDA a head dim of at least 16 (compiled flex rejects smaller ones:
"NYI: embedding dimension ... must be at least 16", torch 2.11). `select_kernel`
(kernels/__init__.py) hands everything else to the compact or dense kernel.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels.training_layout import require_training_layout

_compiled_flex: Callable[..., Any] | None = None


def _flex_fn(device: torch.device) -> Callable[..., Any]:
    """Compiled flex_attention on GPU (the only fast path); eager elsewhere."""
    global _compiled_flex
    if device.type == "cpu":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def sep_mask_mod(kept: KeptSet, window: int) -> Callable[..., torch.Tensor]:
    """mask_mod(b, h, q_idx, kv_idx) -> bool of the SepLLM kept set (see info.py); in the
    aligned layout indices are text positions."""
    is_sep = kept.is_sep  # [B, S] bool
    start = kept.init_start  # [B] long
    a = kept.init_tokens

    def mask_mod(b, h, q_idx, kv_idx):  # traced by flex
        causal = kv_idx <= q_idx
        init = (kv_idx >= start[b]) & (kv_idx < start[b] + a)
        local = q_idx - kv_idx < window
        return causal & (init | local | is_sep[b, kv_idx])

    return mask_mod


def build_block_mask(kept: KeptSet, window: int, device: torch.device) -> Any:
    S = kept.kv_len
    kwargs: dict[str, Any] = {"device": device}
    # _compile=True evaluates the mask_mod tile by tile instead of on a dense [B, S, S] grid.
    if device.type == "cuda" and "_compile" in inspect.signature(create_block_mask).parameters:
        kwargs["_compile"] = True
    return create_block_mask(sep_mask_mod(kept, window), kept.batch_size, None, S, S, **kwargs)


def flex_kernel(
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    *,
    window: int,
    kept: KeptSet | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, S, D]
    kept = require_training_layout("flex", q, k, kept, dropout_p, "flex_attention has no dropout")
    gqa = k.shape[1] != q.shape[1]
    block_mask = kept.window_cache(
        ("flex", window, q.device), lambda: build_block_mask(kept, window, q.device)
    )
    with warnings.catch_warnings():
        # Eager (CPU) flex warns that it is unfused; that path is for tests only.
        warnings.simplefilter("ignore", UserWarning)
        return _flex_fn(q.device)(q, k, v, block_mask=block_mask, enable_gqa=gqa)
