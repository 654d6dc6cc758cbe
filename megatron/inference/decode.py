"""Incremental decoding of our GPTModel over a streaming cache, and chunked streaming.

`forward_step` runs the model's own modules (embedding, each block's norms, projections,
MLP, the output head) on a step of n new tokens against a `StreamCache`; only the attention
differs from `GPTModel.forward`: the keys are the cache's plus the step's, and the SepLLM
kept rule is applied over them through `KeptSet.from_cache` and the dense kernel (the one
kernel that reads positions), so the training path is untouched (no hook in the model).

Kept rule over a cache: keys and queries are described by their *text* positions (invalid
slots at INVALID_POS, outside every window); the window is the layer's training window, and a
layer that trained with full attention (mode full, or a window >= seq_length) attends every
cached key. Positions fed to rotary / learned embeddings are the cache's (`positions`:
cache index under shift, text position otherwise).

`stream` feeds a long input in chunks cut at the cache's `room()`, so compression happens at
exactly the tokens where token-by-token decoding compresses: chunked prefill of a 64k-token
prompt holds at most c + chunk keys and gives token-by-token's results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron.inference.caches import INVALID_POS, Rotary, Step, StreamCache
from megatron.model.rotary import apply_rotary
from megatron.model.transformer import Block, GPTModel
from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels import get_kernel

FULL_WINDOW = 1 << 45  # covers any text distance; INVALID_POS slots stay outside it


def model_rotary(model: GPTModel) -> Rotary | None:
    """The model's RoPE as the cache's re-rotation spec (None without rotary)."""
    rot = model.context.rotary
    return None if rot is None else Rotary(rot.inv_freq, rot.rot_dim)


def layer_window(model: GPTModel, i: int) -> int:
    """Layer i's kept-rule window over a cache (FULL_WINDOW where it trained with full
    attention)."""
    window = model.blocks[i].window
    if model.sep.mode == "full" or window >= model.cfg.seq_length:
        return FULL_WINDOW
    return window


def _kept(model: GPTModel, cache: StreamCache, i: int, n: int) -> KeptSet:
    """Kept set of the step's n queries (the last n entries) over layer i's keys."""
    layer = cache.layer(i)
    key_pos = layer.text_pos
    # Invalid slots get increasing positions far outside every window.
    invalid = torch.arange(key_pos.shape[1], device=key_pos.device) + INVALID_POS
    key_pos = torch.where(layer.valid, key_pos, invalid[None, :])
    if model.sep.mode == "sepllm" and model.sep.separator_token_ids:
        table = torch.tensor(sorted(set(model.sep.separator_token_ids)), device=key_pos.device)
        is_sep = torch.isin(layer.ids, table) & layer.valid
    else:
        is_sep = torch.zeros_like(layer.valid)
    a = max(int(model.sep.init_tokens), 0) if model.sep.mode != "full" else 0
    start = torch.zeros(key_pos.shape[0], dtype=torch.long, device=key_pos.device)
    return KeptSet.from_cache(key_pos, is_sep, start, a, key_pos[:, -n:])


def _attention(
    model: GPTModel, block: Block, i: int, x: torch.Tensor, cache: StreamCache, step: Step
) -> torch.Tensor:  # x [B, n, hidden] (normed) -> [B, n, hidden]
    attn = block.attn
    b, n, _ = x.shape
    d = attn.head_dim
    q, k, v = attn.qkv(x).split([attn.heads * d, attn.kv_heads * d, attn.kv_heads * d], -1)
    q = q.view(b, n, attn.heads, d).transpose(1, 2)  # [B, H, n, D]
    k = k.view(b, n, attn.kv_heads, d).transpose(1, 2)  # [B, Hkv, n, D]
    v = v.view(b, n, attn.kv_heads, d).transpose(1, 2)
    layer = cache.layer(i)
    pos = layer.positions(step)  # [B, n]
    rotary = model.context.rotary
    if rotary is not None:
        cos, sin = rotary.cos_sin(pos, q.dtype)  # [B, n, R]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    keys, values = layer.append(k.contiguous(), v.contiguous(), step, pos)  # [B, Hkv, L, D]
    window = layer_window(model, i)
    if window == FULL_WINDOW and bool(layer.valid.all()):
        # Every held key is kept and none is padding: bottom-right causal attention is the
        # same set (query j of n sees the first L - n + j + 1 keys), through the flash path
        # instead of an n x L boolean mask.
        out = get_kernel("causal")(q, keys, values, window=window, kept=None)
    else:
        kept = _kept(model, cache, i, n)
        out = get_kernel("dense")(q, keys, values, window=window, kept=kept)
    return attn.dense(out.transpose(1, 2).reshape(b, n, attn.heads * d))


@torch.no_grad()
def forward_step(
    model: GPTModel,
    cache: StreamCache,
    ids: torch.Tensor,  # [B, n]
    attention_mask: torch.Tensor | None = None,  # [B, n] 1 real / 0 left padding
) -> torch.Tensor:  # logits [B, n, V]
    """One step of n new tokens through the model with `cache` (then compressed)."""
    step = cache.begin_step(ids, attention_mask)
    try:
        x = model.embedding(ids, cache.layer(0).positions(step))
        for i, block in enumerate(model.blocks):
            attn = block.drop(_attention(model, block, i, block.ln1(x), cache, step))
            if block.parallel_residual:  # GPT-J / NeoX: both branches read the block input
                x = x + attn + block.drop(block.mlp(block.ln2(x)))
            else:
                x = x + attn
                x = x + block.drop(block.mlp(block.ln2(x)))
        logits = model.output(x, model.embedding.embed.weight)
    finally:
        cache.end_step()
    return logits


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
