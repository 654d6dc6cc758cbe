"""Compact SepLLM kernel: exact attention over the kept set without any S x S tensor.

The kept keys of query i split into two disjoint parts:

  local  = window keys {j : i - w < j <= i}  plus initial keys not in the window
  sep    = compact separators (outside the initial range) with j <= i - w

The local part is block-local: queries are cut into blocks of `bs`; block c attends to its own
block and the `nb = ceil((w-1)/bs)` blocks before it plus the `a` initial keys, all in one
batched flash call ([B*C, H, bs, a + (nb+1)*bs] tiles). The separator part runs over the compact
[B, H, M, D] separator keys with a causal tiling: query group g only sees the separators that
are at least w before its last query, so the cost is about half the S x M rectangle.

The two parts are merged by log-sum-exp. The gradient is exact with one trick: the flash
backward of each part is called with the *merged* output and log-sum-exp, so each part's
probabilities are its share of the global softmax (as in ring attention). The CPU flash op's
logsumexp has no autograd, hence the custom autograd.Function.

Cost grows with the pairs computed: S * (a + (nb+1) * bs) + about S * M / 2, against kept
pairs of about S * (a + w) + S * M / 2 and S^2 / 2 for causal attention.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.sepllm.info import SepInfo

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Query group of the separator part: large enough for efficient tiles and few ops (each op is
# a parallel region; on a busy 2-core machine every region costs a scheduling delay), small
# enough that the causal tiling wastes little (about G * M / 2 pairs in total). At most
# SEP_MAX_GROUPS groups, at least SEP_QUERY_GROUP queries each.
SEP_QUERY_GROUP = 256
SEP_MAX_GROUPS = 8
# Short sequences relative to the window (S <= 4 w, and small enough for an S x S mask) go to
# the dense-mask path: the window part would compute nearly all causal pairs anyway.
DENSE_BELOW_WINDOW_RATIO = 4
DENSE_MAX_SEQ = 4096


@dataclass
class _Plan:
    """Everything the kernel derives from (info, window): built once per batch, shared."""

    bs: int  # query block of the local part
    nb: int  # previous blocks each block attends to
    C: int  # number of query blocks (S padded up to C * bs)
    a: int  # initial keys
    init_idx: torch.Tensor | None  # [B, a] long, clamped to S - 1 (masked where out of range)
    mask1: torch.Tensor  # [B*C, 1, bs, a + (nb+1)*bs] float 0 / -inf
    groups: list[tuple[int, int, int, torch.Tensor]]  # (g0, g1, m, mask [B, 1, g1-g0, m])
    M: int  # width of the compact separator keys actually used (max over groups)
    empty: torch.Tensor | None  # [B, 1, S] bool: queries that see no separator


def block_size(window: int) -> int:
    """Query block of the local part: the window itself, but at least 32 so tiles stay efficient."""
    return max(window, 32)


def _local_mask(info: SepInfo, window: int, bs: int, nb: int, C: int, dtype: torch.dtype):
    S, a, dev = info.seq_len, info.init_tokens, info.device
    B = info.batch_size
    i = (torch.arange(C, device=dev)[:, None] * bs + torch.arange(bs, device=dev)[None, :])[
        ..., None
    ]  # [C, bs, 1] query positions
    t = torch.arange((nb + 1) * bs, device=dev)
    p = torch.arange(C, device=dev)[:, None, None] * bs - nb * bs + t[None, None, :]  # [C, 1, T]
    keep_w = (p >= 0) & (p <= i) & (i - p < window) & (p < S)  # [C, bs, T]
    keep_w = keep_w[None].expand(B, C, bs, t.numel())
    parts = []
    init_idx = None
    if a > 0:
        pi = info.init_start[:, None] + torch.arange(a, device=dev)[None, :]  # [B, a]
        pi4 = pi[:, None, None, :]  # [B, 1, 1, a]
        # Initial keys inside the window belong to the window part: the parts stay disjoint.
        keep_i = (pi4 < S) & (pi4 <= i[None]) & (i[None] - pi4 >= window)  # [B, C, bs, a]
        parts.append(keep_i)
        init_idx = pi.clamp(max=S - 1)
    parts.append(keep_w)
    keep = torch.cat(parts, dim=-1)  # [B, C, bs, a + T]
    zero = torch.zeros((), dtype=dtype, device=dev)
    mask = torch.where(keep, zero, torch.full((), -math.inf, dtype=dtype, device=dev))
    return mask.reshape(B * C, 1, bs, keep.shape[-1]), init_idx


def _sep_groups(info: SepInfo, window: int, dtype: torch.dtype):
    """Causal tiling of the separator part: per query group, the separators it can see.

    Returns (groups, M, empty): groups of (g0, g1, m, mask [B, 1, g1-g0, m] float 0 / -inf),
    M the widest m, empty [B, 1, S] bool for queries that see no separator (their part-2
    logsumexp must be -inf; the flash op returns 0 for an all-masked row).
    """
    S, dev = info.seq_len, info.device
    groups: list[tuple[int, int, int, torch.Tensor]] = []
    if info.sep_pos.shape[1] == 0:
        return groups, 0, None
    sep_pos = info.sep_pos  # [B, M], padded with S
    first_visible = torch.where(
        info.sep_count > 0, sep_pos[:, 0] + window, torch.full_like(info.sep_count, S)
    )  # [B]
    empty = (torch.arange(S, device=dev)[None, :] < first_visible[:, None])[:, None]
    G = max(SEP_QUERY_GROUP, -(-S // SEP_MAX_GROUPS))
    limits = (torch.arange(G - 1, S + G - 1, G).clamp(max=S - 1) - window).to(dev)
    # Visible separators of each group's last query, max over the batch: [n_groups]
    limits = limits[None, :].expand(sep_pos.shape[0], -1).contiguous()
    widths = torch.searchsorted(sep_pos, limits, right=True).max(dim=0).values.tolist()
    zero = torch.zeros((), dtype=dtype, device=dev)
    neg = torch.full((), -math.inf, dtype=dtype, device=dev)
    for g, m in enumerate(widths):
        if m == 0:
            continue  # no query of this group sees a separator
        g0, g1 = g * G, min(S, (g + 1) * G)
        i = torch.arange(g0, g1, device=dev)  # [G]
        keep = sep_pos[:, None, :m] <= (i - window)[None, :, None]  # [B, G, m]
        groups.append((g0, g1, m, torch.where(keep, zero, neg)[:, None]))
    return groups, max(widths), empty


def _build_plan(info: SepInfo, window: int, dtype: torch.dtype) -> _Plan:
    S = info.seq_len
    bs = block_size(window)
    nb = -(-(window - 1) // bs)  # ceil((w-1)/bs): previous blocks a window can reach
    C = -(-S // bs)
    mask1, init_idx = _local_mask(info, window, bs, nb, C, dtype)
    groups, M, empty = _sep_groups(info, window, dtype)
    return _Plan(bs, nb, C, info.init_tokens, init_idx, mask1, groups, M, empty)


def _to_blocks(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[B, H, S, D] -> [B*C, H, bs, D] (zero-padded to C * bs)."""
    B, H, S, D = x.shape
    x = F.pad(x, (0, 0, 0, plan.C * plan.bs - S))
    x = x.view(B, H, plan.C, plan.bs, D).transpose(1, 2)
    return x.reshape(B * plan.C, H, plan.bs, D)


def _from_blocks(x: torch.Tensor, plan: _Plan, B: int, S: int) -> torch.Tensor:
    """[B*C, H, bs, D] -> [B, H, S, D]."""
    _, H, bs, D = x.shape
    return x.view(B, plan.C, H, bs, D).transpose(1, 2).reshape(B, H, plan.C * bs, D)[:, :, :S]


def _lse_to_blocks(lse: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[B, H, S] -> [B*C, H, bs]."""
    B, H, S = lse.shape
    lse = F.pad(lse, (0, plan.C * plan.bs - S))
    return lse.view(B, H, plan.C, plan.bs).transpose(1, 2).reshape(B * plan.C, H, plan.bs)


def _lse_from_blocks(lse: torch.Tensor, plan: _Plan, B: int, S: int) -> torch.Tensor:
    """[B*C, H, bs] -> [B, H, S] (float32)."""
    _, H, bs = lse.shape
    lse = lse.view(B, plan.C, H, bs).transpose(1, 2).reshape(B, H, plan.C * bs)
    return lse[:, :, :S].float()


def _local_keys(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[B, H, S, D] -> [B*C, H, a + (nb+1)*bs, D]: initial keys, then the window blocks."""
    B, H, S, D = x.shape
    bs, nb, C = plan.bs, plan.nb, plan.C
    xp = F.pad(x, (0, 0, nb * bs, C * bs - S))  # [B, H, (nb + C) * bs, D]
    blocks = xp.view(B, H, nb + C, bs, D).transpose(1, 2)  # [B, nb + C, H, bs, D]
    parts = []
    if plan.init_idx is not None:
        idx = plan.init_idx[:, None, :, None].expand(B, H, plan.a, D)
        init = x.gather(2, idx)  # [B, H, a, D]
        parts.append(init[:, None].expand(B, C, H, plan.a, D))
    parts += [blocks[:, t : t + C] for t in range(nb + 1)]
    keys = torch.cat(parts, dim=3)  # [B, C, H, L1, D]
    return keys.view(B * C, H, keys.shape[3], D)


class _CompactAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_loc, v_loc, k_sep, v_sep, plan: _Plan):  # noqa: ANN001
        B, H, S, D = q.shape
        q1 = _to_blocks(q, plan)
        o1, l1 = _flash(q1, k_loc, v_loc, attn_mask=plan.mask1)
        out = _from_blocks(o1, plan, B, S).float()  # [B, H, S, D]
        lse = _lse_from_blocks(l1, plan, B, S)  # [B, H, S]
        if plan.groups:
            # Collect the separator part of every group, then merge once (fewer, larger ops).
            o2 = torch.zeros_like(out)
            l2 = torch.full_like(lse, -math.inf)
            for g0, g1, m, mask in plan.groups:
                og, lg = _flash(q[:, :, g0:g1], k_sep[:, :, :m], v_sep[:, :, :m], attn_mask=mask)
                o2[:, :, g0:g1] = og
                l2[:, :, g0:g1] = lg
            l2.masked_fill_(plan.empty, -math.inf)  # all-masked rows: flash gives 0, not -inf
            merged = torch.logaddexp(lse, l2)
            out = out * torch.exp(lse - merged)[..., None] + o2 * torch.exp(l2 - merged)[..., None]
            lse = merged
        out = out.to(q.dtype)
        ctx.plan = plan
        ctx.save_for_backward(q, k_loc, v_loc, k_sep, v_sep, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):  # noqa: ANN001
        q, k_loc, v_loc, k_sep, v_sep, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        B, H, S, D = q.shape
        d_out = d_out.contiguous()
        # Each part's backward with the merged out / lse gives its share of the exact gradient.
        dq1, dk_loc, dv_loc = _flash_bwd(
            _to_blocks(d_out, plan),
            _to_blocks(q, plan),
            k_loc,
            v_loc,
            _to_blocks(out, plan),
            _lse_to_blocks(lse, plan),
            0.0,
            False,
            attn_mask=plan.mask1,
        )
        dq = _from_blocks(dq1, plan, B, S).contiguous()
        dk_sep = torch.zeros_like(k_sep) if k_sep is not None else None
        dv_sep = torch.zeros_like(v_sep) if v_sep is not None else None
        for g0, g1, m, mask in plan.groups:
            dqg, dkg, dvg = _flash_bwd(
                d_out[:, :, g0:g1],
                q[:, :, g0:g1],
                k_sep[:, :, :m],
                v_sep[:, :, :m],
                out[:, :, g0:g1],
                lse[:, :, g0:g1],
                0.0,
                False,
                attn_mask=mask,
            )
            dq[:, :, g0:g1] += dqg
            dk_sep[:, :, :m] += dkg
            dv_sep[:, :, :m] += dvg
        return dq, dk_loc, dv_loc, dk_sep, dv_sep, None


_dropout_warned = False


def compact_kernel(
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    *,
    window: int,
    info: SepInfo | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, S, D]
    B, H, S, D = q.shape
    gqa = k.shape[1] != H
    if info is None or window >= S:  # every causal pair is kept
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa
        )
    if dropout_p > 0.0:
        # Attention-probability dropout needs the full probability tiles: use the reference.
        global _dropout_warned
        if not _dropout_warned:
            warnings.warn(
                "compact kernel: dropout_p > 0 falls back to the dense kernel", stacklevel=2
            )
            _dropout_warned = True
        from megatron.sepllm.kernels.dense import dense_kernel

        return dense_kernel(q, k, v, window=window, info=info, dropout_p=dropout_p)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if S <= DENSE_BELOW_WINDOW_RATIO * window and S <= DENSE_MAX_SEQ:
        # The window alone covers most causal pairs: nothing to skip, and one masked SDPA call
        # beats the two-part split (measured: S=1024, w=256 compact 0.87x the mask reference).
        from megatron.sepllm.kernels.dense import dense_kernel

        return dense_kernel(q, k, v, window=window, info=info)
    if gqa:  # expand outside the Function: autograd sums the group gradients back
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    plan = info.window_cache(
        ("compact", window, q.dtype, q.device), lambda: _build_plan(info, window, q.dtype)
    )
    k_loc, v_loc = _local_keys(k, plan), _local_keys(v, plan)
    k_sep = v_sep = None
    if plan.groups:
        pos = info.sep_pos[:, : plan.M].clamp(max=S - 1)  # padding S -> any key, masked
        idx = pos[:, None, :, None].expand(B, H, plan.M, D)
        k_sep, v_sep = k.gather(2, idx), v.gather(2, idx)  # [B, H, M, D]
    return _CompactAttention.apply(q.contiguous(), k_loc, v_loc, k_sep, v_sep, plan)
