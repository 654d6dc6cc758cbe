"""The cache contract of `GPTModel.forward` (one forward with an optional cache, as nanochat
and litgpt do): training, chunked prefill and decoding run the same modules and the same
`select_kernel`; only where the keys come from differs.

A cache (megatron/inference/caches.py's `StreamCache` is the one implementation) is driven in
steps by the model itself:

    step = cache.begin_step(ids [B, n], attention_mask [B, n] | None)  # the step's token ids
    for each layer l:  pos = cache.layer(l).positions(step)            # [B, n] rotary positions
                       keys, values = cache.layer(l).append(k, v, step, pos)
                       key_pos, is_sep = cache.layer(l).kept_keys()    # what it holds, by text
    cache.end_step()                                                   # compress (evict)

The kept rule over what a layer holds is `kept_over_cache`: the same `KeptSet` description as
training (`KeptSet.from_cache`), with separators flagged by the cache (its `separator_ids`,
the one list both eviction and the kept rule read).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels import flex_available, select_kernel, triton_available

# A window covering any text distance, for layers that trained with full attention; the
# cache's invalid slots sit at positions far below every real one, outside it.
FULL_WINDOW = 1 << 45


class LayerKV(Protocol):
    valid: torch.Tensor  # [B, L] bool: slot holds a real token (False: padding / compacted)

    def positions(self, step: Any) -> torch.Tensor: ...  # [B, n] long: rotary positions

    def append(
        self, k: torch.Tensor, v: torch.Tensor, step: Any, rot_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...  # keys, values [B, Hkv, L + n, D]

    def kept_keys(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # key_pos, is_sep [B, L]


class KVCache(Protocol):
    separator_ids: list[int]
    pos_shift: bool  # held keys follow their cache index (re-rotated when entries move)
    bipe: Any  # the model's BiPE counters of the text so far (megatron/sepllm/bipe.py)

    def begin_step(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any: ...

    def layer(self, i: int) -> LayerKV: ...

    def end_step(self) -> None: ...


def kept_over_cache(
    layer: LayerKV,
    n: int,  # the step's queries: the last n held entries
    init_tokens: int,  # a (0: no initial block)
    separators: bool,  # whether separators are kept (sepllm) or not (streamingllm / full)
) -> KeptSet:
    """Kept set of a step's n queries over everything `layer` holds after `append`."""
    key_pos, is_sep = layer.kept_keys()  # [B, L]
    if not separators:
        is_sep = torch.zeros_like(is_sep)
    start = torch.zeros(key_pos.shape[0], dtype=torch.long, device=key_pos.device)
    return KeptSet.from_cache(key_pos, is_sep, start, init_tokens, key_pos[:, -n:])


def layer_kept(
    layer: LayerKV, n: int, sep: SepLLMConfig, window: int, full: bool
) -> tuple[KeptSet | None, int]:
    """(kept set, window) of a step's n queries over what `layer` holds: None (bottom-right
    causal) for a layer that trained with full attention when every held slot is real; else
    the kept rule, with FULL_WINDOW for full layers (it then only masks invalid slots)."""
    if full and bool(layer.valid.all()):
        return None, FULL_WINDOW
    if full:
        return kept_over_cache(layer, n, 0, False), FULL_WINDOW
    a = max(int(sep.init_tokens), 0)
    return kept_over_cache(layer, n, a, sep.mode == "sepllm"), window


def kernel_name(
    sep: SepLLMConfig,
    kept: KeptSet | None,
    q_len: int,
    kv_len: int,
    window: int,
    head_dim: int,
    dropout_p: float,
    device_type: str,
) -> str:
    """`select_kernel` for one layer call: training (aligned), or a step over a cache (kept set
    from the cache, or None: bottom-right causal over every held key)."""
    # select_kernel reads mode "full" as "no kept set"; a full-attention layer over a cache
    # with invalid slots has one (window FULL_WINDOW, no sinks: StreamingLLM's shape).
    if kept is None:
        mode = "full"
    else:
        mode = "streamingllm" if sep.mode == "full" else sep.mode
    return select_kernel(
        sep.attention_kernel,
        device_type=device_type,
        q_len=q_len,
        kv_len=kv_len,
        window=window,
        head_dim=head_dim,
        dropout_p=dropout_p,
        flex_available=flex_available(),
        triton_available=triton_available(device_type),
        mode=mode,
        aligned=kept.aligned if kept is not None else q_len == kv_len,
    )


def check_separators(cache: KVCache, mode: str, trained: list[int]) -> None:
    """A SepLLM-trained model's kept rule and the cache's eviction read one separator list:
    the cache's, which must be the one the model trained with."""
    if mode == "sepllm" and sorted(set(cache.separator_ids)) != sorted(set(trained)):
        raise ValueError(
            f"the cache's separator_ids {sorted(set(cache.separator_ids))} differ from the "
            f"model's sepllm.separator_token_ids {sorted(set(trained))}: build the cache with "
            "the model's separators (the kept rule and the eviction use one list)"
        )
