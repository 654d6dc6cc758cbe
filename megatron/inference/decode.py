"""Streaming with our GPTModel: the loop around `GPTModel.forward(ids, cache=...)`.

The model's own forward runs every step (megatron/model/cache.py describes the cache
contract): the same modules and the same `select_kernel` as training, with the SepLLM kept
rule applied over what each layer holds (`kept_over_cache`). This module only drives it:
`forward_step` (one step, no autograd), `chunks` (prefill cut where token-by-token decoding
compresses) and the model's RoPE as the cache's re-rotation spec.

`stream` feeds a long input in chunks cut at the cache's `room()`, so compression happens at
exactly the tokens where token-by-token decoding compresses: chunked prefill of a 64k-token
prompt holds at most c + chunk keys and gives token-by-token's results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron.inference.caches import Rotary, StreamCache
from megatron.model.transformer import GPTModel


def model_rotary(model: GPTModel) -> Rotary | None:
    """The model's RoPE as the cache's re-rotation spec (None without rotary)."""
    rot = model.context.rotary
    return None if rot is None else Rotary(rot.inv_freq, rot.rot_dim)


@torch.no_grad()
def forward_step(
    model: GPTModel,
    cache: StreamCache,
    ids: torch.Tensor,  # [B, n]
    attention_mask: torch.Tensor | None = None,  # [B, n] 1 real / 0 left padding
) -> torch.Tensor:  # logits [B, n, V]
    """One step of n new tokens through the model with `cache` (then compressed)."""
    return model(ids, cache=cache, attention_mask=attention_mask)


StepFn = Callable[[StreamCache, torch.Tensor], torch.Tensor]  # (cache, ids [B, n]) -> logits


def our_step(model: GPTModel) -> StepFn:
    return lambda cache, ids: forward_step(model, cache, ids)


def chunks(
    cache: StreamCache, total: int, chunk_size: int, exact: bool = True
) -> Iterator[tuple[int, int]]:
    """(start, end) spans over `total` tokens, each at most chunk_size. `exact`: also cut at
    the cache's room, so compression falls where token-by-token decoding would do it (same
    results); otherwise fixed chunks, compressed after each (faster prefill for a sink cache,
    whose room is 1 once full; still at most c + chunk_size keys)."""
    start = 0
    while start < total:
        room = cache.room() if exact else chunk_size
        end = min(total, start + max(1, min(chunk_size, room)))
        yield start, end
        start = end
