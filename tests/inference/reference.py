"""Independent references for the streaming caches (used by the tests only).

`simulate_policy` replays an eviction policy on plain Python lists of text positions, from its
definition in docs/streaming.md; `reference_decode` decodes token by token with a full cache
that never evicts: every layer keeps every token's *raw* (un-rotated) key and value, and step t
attends only to the positions the policy still holds at t, with the positions it gives them
(index in the held list under shift, else the index it had when it was computed: the
original's no-shift positions), rotating raw keys afresh.
Neither shares code with megatron/inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megatron.model.rotary import apply_rotary
from megatron.model.transformer import GPTModel


def compress(
    held: list[int], ids: Sequence[int], kind: str, a: int, s: int, w: int, c: int, seps: set[int]
) -> tuple[list[int], int, int]:
    """One compression of `held` (text positions) if it exceeds c; returns (held, c, s)."""
    if kind == "full" or len(held) <= c:
        return held, c, s
    if kind == "sink":
        return held[:a] + held[len(held) - (c - a) :], c, s
    init, middle, local = held[:a], held[a : len(held) - w], held[len(held) - w :]
    kept_seps = [j for j in middle if ids[j] in seps]
    if kind == "sep_grow":  # s and c grow by what the separators exceed s
        grow = max(0, len(kept_seps) - s)
        c, s = c + grow, s + grow
    else:
        kept_seps = kept_seps[max(0, len(kept_seps) - s) :] if s > 0 else []
    return init + kept_seps + local, c, s


def simulate_policy(
    ids: Sequence[int], kind: str, a: int, s: int, w: int, c: int, seps: set[int]
) -> list[list[int]]:
    """held[t]: the text positions step t attends to (held after step t-1, plus t)."""
    held: list[int] = []
    out = []
    for t in range(len(ids)):
        held = held + [t]
        out.append(list(held))
        held, c, s = compress(held, ids, kind, a, s, w, c, seps)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H, D], k / v [Hkv, L, D] -> [H, D] by an explicit softmax."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = torch.einsum("hd,hld->hl", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hl,hld->hd", scores.softmax(-1), v)


def _rope(model: GPTModel, x: torch.Tensor, pos: list[int]) -> torch.Tensor:
    """x [H, L, D] rotated at positions pos (fresh, from raw)."""
    rot = model.context.rotary
    if rot is None:
        return x
    cos, sin = rot.cos_sin(torch.tensor(pos), x.dtype)
    return apply_rotary(x[None], cos, sin)[0]


def _visible(model: GPTModel, held: list[int], t: int, ids: Sequence[int]) -> list[int]:
    """The model's own SepLLM kept rule (text positions) over the held positions."""
    sep = model.sep
    if sep.mode == "full":
        return held
    w = model.blocks[0].window
    if w >= model.cfg.seq_length:
        return held
    table = set(sep.separator_token_ids) if sep.mode == "sepllm" else set()
    return [j for j in held if j < sep.init_tokens or t - j < w or ids[j] in table]


@torch.no_grad()
def reference_decode(
    model: GPTModel, ids: Sequence[int], held_per_step: list[list[int]], shift: bool
) -> torch.Tensor:  # logits [T, V]
    raw_k: list[list[torch.Tensor]] = [[] for _ in model.blocks]  # per layer, [Hkv, D] per t
    raw_v: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    out, computed_at = [], []
    for t, held in enumerate(held_per_step):
        visible = _visible(model, held, t, ids)
        computed_at.append(held.index(t))  # the cache index token t had at its own step
        pos_of = {j: (held.index(j) if shift else computed_at[j]) for j in held}
        x = model.embedding(torch.tensor([[ids[t]]]), torch.tensor([pos_of[t]]))[0, 0]
        for i, block in enumerate(model.blocks):
            attn = block.attn
            d = attn.head_dim
            qkv = attn.qkv(block.ln1(x)[None])[0]
            q, k, v = qkv.split([attn.heads * d, attn.kv_heads * d, attn.kv_heads * d])
            raw_k[i].append(k.view(attn.kv_heads, d))
            raw_v[i].append(v.view(attn.kv_heads, d))
            q = _rope(model, q.view(attn.heads, 1, d), [pos_of[t]])[:, 0]
            keys = torch.stack([raw_k[i][j] for j in visible], 1)  # [Hkv, L, D]
            keys = _rope(model, keys, [pos_of[j] for j in visible])
            values = torch.stack([raw_v[i][j] for j in visible], 1)
            a = attn.dense(_attend(q, keys, values).reshape(1, -1))[0]
            if block.parallel_residual:
                x = x + a + block.mlp(block.ln2(x)[None])[0]
            else:
                x = x + a
                x = x + block.mlp(block.ln2(x)[None])[0]
        out.append(model.output(x[None, None], model.embedding.embed.weight)[0, 0])
    return torch.stack(out)


def nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [T, V], ids [T] -> [T-1] NLL of each next token."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")
