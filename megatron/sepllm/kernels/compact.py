"""Compact SepLLM kernel: exact attention over the kept set without any S x S tensor.

The kept keys of query i split into two disjoint parts:

  window = {j : i - w < j <= i}
  far    = initial keys and separators with j <= i - w (initial keys come before every
           separator, so one sorted compact list [B, a + M] holds both)

Layout: every tensor is a [B, H, S, D] view of [B, S, H, D] storage, the projections' output
layout and the one torch's CPU flash op works in, so most views below cost no copy.

The window part is block-local: queries are cut into blocks of `bs`; block n attends to its own
block and the `nb = ceil((w-1)/bs)` blocks before it. All rows go through one part call of
[B*C, H, bs, (nb+1)*bs] tiles: the queries are a view of Q, the keys an overlapping as_strided
view of one flat zero-led copy of K / V (a block's slots before its row's start hold the
previous row's keys, masked). The far part runs over the compact [B, H, a + M, D] keys with a
causal tiling: query group g only sees the far keys at least w before its last query, so the
cost is about half the S x M rectangle plus G * M / 2.

The parts are merged by log-sum-exp. The gradient is exact with one trick: each part's
backward is called with the *merged* output and log-sum-exp, so each part's probabilities are
its share of the global softmax (as in ring attention). The fused ops' log-sum-exp has no
autograd, hence the custom autograd.Function over q, k, v (no autograd graph of gathers / pads);
window-part key gradients are folded back from the overlapping tiles with nb adds, far-key
gradients scattered with one index_add_. The per-part ops are device backends (parts.py): the
CPU flash op, CUDA's memory-efficient op, or explicit matmuls.

Cost grows with the pairs computed: S * (nb+1) * bs + about S * M / 2, against kept
pairs of about S * (a + w) + S * M / 2 and S^2 / 2 for causal attention.

Contract: the aligned training layout only (queries and keys are the same S tokens), no
attention dropout. `select_kernel` (kernels/__init__.py) decides when this kernel is used; it
hands dropout, short sequences (S <= 4 w) and decode steps to the dense kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels.parts import part_backward, part_forward
from megatron.sepllm.kernels.training_layout import require_training_layout, require_window

# Query group of the separator part. torch's CPU flash op tiles queries by 256 only when a call
# has >= 768 queries (else by 64 or 32, measured ~10% slower per pair here), so groups hold at
# least SEP_QUERY_GROUP queries; the causal tiling wastes about G * M / 2 pairs in total, and
# each group is one op call (a parallel region), so at most SEP_MAX_GROUPS groups.
SEP_QUERY_GROUP = 768
SEP_MAX_GROUPS = 16


@dataclass
class _FarGroup:
    g0: int  # queries [g0, g1)
    g1: int
    m: int  # far keys this group can see (a prefix of the compact list)
    mask: torch.Tensor  # [B, 1, g1 - g0, m] additive 0 / -inf
    empty: torch.Tensor  # [B, 1, g1 - g0] bool: query sees no far key (its part lse is -inf)


@dataclass
class _Plan:
    """Everything the kernel derives from (kept set, window): built once per batch, shared."""

    bs: int  # query block of the window part
    nb: int  # previous blocks each block attends to
    C: int  # query blocks per row (S padded up to Sp = C * bs)
    B: int
    mask1: torch.Tensor  # [B * C, 1, bs, (nb+1)*bs] additive 0 / -inf
    far_flat: torch.Tensor | None  # [B * M] long: row * Sp + position of each far key
    groups: list[_FarGroup]
    M: int  # width of the compact far keys actually used (max over groups)

    @property
    def Sp(self) -> int:  # the padded sequence length
        return self.C * self.bs


def block_size(window: int) -> int:
    """Query block of the window part: the window, but at least 32 so tiles stay efficient."""
    return max(window, 32)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [..., Sk] -> additive 0 / -inf mask whose row stride is a multiple of 16 elements
    (the CUDA memory-efficient op needs aligned bias rows; the CPU op reads any stride)."""
    sk = keep.shape[-1]
    buf = torch.empty(*keep.shape[:-1], -(-sk // 16) * 16, dtype=dtype, device=keep.device)
    mask = buf[..., :sk]
    mask.fill_(-math.inf).masked_fill_(keep, 0.0)
    return mask


def _local_mask(window: int, B: int, bs: int, nb: int, C: int, dtype, dev):
    """[B * C, 1, bs, (nb+1)*bs]: query block c of a row sees key blocks c - nb .. c.

    Key slots before the row's start hold the previous row's keys (or zeros): masked. Keys past
    S in a padded tail are not masked, so no query row (padded ones included) is empty.
    """
    i = (torch.arange(C, device=dev)[:, None] * bs + torch.arange(bs, device=dev)[None, :])[
        ..., None
    ]  # [C, bs, 1] query positions
    t = torch.arange((nb + 1) * bs, device=dev)
    p = torch.arange(C, device=dev)[:, None, None] * bs - nb * bs + t[None, None, :]  # [C, 1, T]
    keep = (p >= 0) & (p <= i) & (i - p < window)  # [C, bs, T]
    return _additive(keep[:, None].repeat(B, 1, 1, 1), dtype)


def _far_keys(kept: KeptSet) -> torch.Tensor:
    """[B, a + M] positions of the initial keys then the separators; S marks "no key".

    Initial keys come before every separator (separators are outside and after the initial
    range), so the row stays sorted.
    """
    S, a, dev = kept.kv_len, kept.init_tokens, kept.device
    parts = []
    if a > 0:
        pi = kept.init_start[:, None] + torch.arange(a, device=dev)[None, :]  # [B, a]
        parts.append(pi.clamp(max=S))
    parts.append(kept.sep_pos)
    return torch.cat(parts, dim=1)


def _far_groups(kept: KeptSet, window: int, dtype: torch.dtype):
    """Causal tiling of the far part (initial keys and separators at least w back).

    Returns (far_pos [B, M], groups, M); query group g sees only the far keys at least w before
    its last query, so the work is about half the S x M rectangle.
    """
    S, dev = kept.kv_len, kept.device
    groups: list[_FarGroup] = []
    pos = _far_keys(kept)  # [B, Mt], sorted, padded with S
    if pos.shape[1] == 0:
        return None, groups, 0
    n_groups = max(1, min(SEP_MAX_GROUPS, S // SEP_QUERY_GROUP))
    G = -(-S // n_groups)  # equal groups, each >= SEP_QUERY_GROUP queries when S allows
    limits = (torch.arange(G - 1, S + G - 1, G).clamp(max=S - 1) - window).to(dev)
    limits = limits[None, :].expand(pos.shape[0], -1).contiguous()
    widths = torch.searchsorted(pos, limits, right=True).max(dim=0).values.tolist()
    for g, m in enumerate(widths):
        if m == 0:
            continue  # no query of this group sees a far key
        g0, g1 = g * G, min(S, (g + 1) * G)
        i = torch.arange(g0, g1, device=dev)  # [G]
        keep = pos[:, None, :m] <= (i - window)[None, :, None]  # [B, G, m]
        empty = ~keep.any(dim=-1)[:, None]  # [B, 1, G]
        groups.append(_FarGroup(g0, g1, m, _additive(keep[:, None], dtype), empty))
    M = max(widths)
    return pos[:, :M].clamp(max=S - 1).contiguous(), groups, M


def _build_plan(kept: KeptSet, window: int, dtype: torch.dtype) -> _Plan:
    S, B = kept.kv_len, kept.batch_size
    bs = block_size(window)
    nb = -(-(window - 1) // bs)  # ceil((w-1)/bs): previous blocks a window can reach
    C = -(-S // bs)
    mask1 = _local_mask(window, B, bs, nb, C, dtype, kept.device)
    far_pos, groups, M = _far_groups(kept, window, dtype)
    far_flat = None
    if groups:
        rows = torch.arange(B, device=kept.device)[:, None]
        far_flat = (rows * (C * bs) + far_pos).reshape(-1)
    return _Plan(bs, nb, C, B, mask1, far_flat, groups, M)


# Layout. Every tensor the kernel touches is a [B, H, S, D] view of [B, S, H, D] storage (the
# flash op's native layout and the projections' output layout), so the window part is one
# flash call over all rows with zero-copy block views of q, out, d_out and dq.


def _bshd(x: torch.Tensor, Sp: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, Sp, D] view of contiguous [B, Sp, H, D] storage (zero padded);
    no copy when x already is one."""
    B, H, S, D = x.shape
    if Sp == S and x.transpose(1, 2).is_contiguous():
        return x
    buf = x.new_empty(B, Sp, H, D)
    buf[:, :S].copy_(x.transpose(1, 2))
    buf[:, S:].zero_()
    return buf.transpose(1, 2)


def _qblocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    """[B, H, Sp, ...] (BSHD / BSH storage) -> [B * Sp / bs, H, bs, ...] view."""
    B, H, Sp = x.shape[:3]
    return x.transpose(1, 2).view(B * Sp // bs, bs, H, *x.shape[3:]).transpose(1, 2)


def _unblock(x: torch.Tensor, B: int) -> torch.Tensor:
    """[N, H, bs, ...] -> [B, H, Sp, ...] (a view when x has BSHD storage, as the ops return)."""
    N, H, bs = x.shape[:3]
    y = x.transpose(1, 2).reshape(B, N * bs // B, H, *x.shape[3:])
    return y.transpose(1, 2)


def _padded_keys(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[B, H, S, D] -> flat [nb*bs + B*Sp, H, D]: nb zero blocks, then each row padded to Sp."""
    B, H, S, D = x.shape
    lead = plan.nb * plan.bs
    buf = x.new_empty(lead + B * plan.Sp, H, D)
    buf[:lead].zero_()
    rows = buf[lead:].view(B, plan.Sp, H, D)
    rows[:, :S].copy_(x.transpose(1, 2))
    rows[:, S:].zero_()
    return buf


def _kblocks(flat: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """flat padded keys -> [B * C, H, (nb+1)*bs, D] overlapping view: query block n sees
    padded key blocks n .. n + nb (flat key blocks n - nb .. n)."""
    _, H, D = flat.shape
    bs = plan.bs
    return flat.as_strided((plan.B * plan.C, H, (plan.nb + 1) * bs, D), (bs * H * D, D, H * D, 1))


def _fold_keys(dk1: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Window-part key gradients [B*C, H, (nb+1)*bs, D] -> [B, H, Sp, D] (BSHD storage).

    Slot t of query block n is flat key block n + t - nb; slots that fall before a row's
    start carry exact zeros (masked keys), so summing across row boundaries is harmless.
    """
    N, H, T, D = dk1.shape
    nb = plan.nb
    tiles = dk1.transpose(1, 2).reshape(N, nb + 1, plan.bs, H, D)
    acc = torch.empty(N, plan.bs, H, D, dtype=dk1.dtype, device=dk1.device)
    if nb == 0 or N == 1:
        acc.copy_(tiles[:, nb])
        first = nb
    else:
        torch.add(tiles[:-1, nb], tiles[1:, nb - 1], out=acc[:-1])
        acc[-1].copy_(tiles[-1, nb])
        first = nb - 1
    for t in range(first):
        sh = nb - t
        if sh < N:
            acc[: N - sh].add_(tiles[sh:, t])
    return acc.view(plan.B, plan.Sp, H, D).transpose(1, 2)


class _CompactAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        B, H, S, D = q.shape
        qs = _bshd(q, plan.Sp)  # [B, H, Sp, D]
        kp, vp = _padded_keys(k, plan), _padded_keys(v, plan)
        o1, l1 = part_forward(
            _qblocks(qs, plan.bs), _kblocks(kp, plan), _kblocks(vp, plan), plan.mask1
        )
        out = _unblock(o1, B)  # [B, H, Sp, D]
        lse = _unblock(l1, B)  # [B, H, Sp] float32
        k_far = v_far = None
        if plan.groups:
            k_far, v_far = _gather_far(kp, plan), _gather_far(vp, plan)  # [B, H, M, D]
            for g in plan.groups:
                og, lg = part_forward(
                    qs[:, :, g.g0 : g.g1], k_far[:, :, : g.m], v_far[:, :, : g.m], g.mask
                )
                _merge(out[:, :, g.g0 : g.g1], lse[:, :, g.g0 : g.g1], og, lg, g.empty)
        ctx.plan = plan
        ctx.save_for_backward(qs, kp, vp, k_far, v_far, out, lse)
        return out[:, :, :S]

    @staticmethod
    def backward(ctx, d_out):
        qs, kp, vp, k_far, v_far, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        B, H, S, D = d_out.shape
        dos = _bshd(d_out, plan.Sp)
        # Each part's backward with the merged out / lse gives its share of the gradient.
        blocks = (
            _qblocks(dos, plan.bs),
            _qblocks(qs, plan.bs),
            _kblocks(kp, plan),
            _kblocks(vp, plan),
            _qblocks(out, plan.bs),
            _qblocks(lse, plan.bs),
        )
        dq1, dk1, dv1 = part_backward(*blocks, plan.mask1)
        dq = _unblock(dq1, B)
        dk, dv = _fold_keys(dk1, plan), _fold_keys(dv1, plan)
        if plan.groups:
            dk_far = torch.zeros_like(k_far)
            dv_far = torch.zeros_like(v_far)
            for g in plan.groups:
                sl = slice(g.g0, g.g1)
                dqg, dkg, dvg = part_backward(
                    dos[:, :, sl],
                    qs[:, :, sl],
                    k_far[:, :, : g.m],
                    v_far[:, :, : g.m],
                    out[:, :, sl],
                    lse[:, :, sl],
                    g.mask,
                )
                dq[:, :, sl] += dqg
                dk_far[:, :, : g.m] += dkg
                dv_far[:, :, : g.m] += dvg
            for dx, dx_far in ((dk, dk_far), (dv, dv_far)):
                # index_add_ over flat rows (index_put_ accumulate measured ~20x slower on CPU)
                flat = dx.transpose(1, 2).view(B * plan.Sp, H, D)
                flat.index_add_(0, plan.far_flat, dx_far.transpose(1, 2).reshape(-1, H, D))
        return dq[:, :, :S], dk[:, :, :S], dv[:, :, :S], None


def _gather_far(flat: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Padded flat keys [nb*bs + B*Sp, H, D] -> [B, H, M, D] (BSHD storage): the initial keys
    and separators (one index_select over rows; advanced indexing measured ~2.5x slower)."""
    _, H, D = flat.shape
    rows = flat.index_select(0, plan.far_flat + plan.nb * plan.bs)  # [B * M, H, D]
    return rows.view(plan.B, plan.M, H, D).transpose(1, 2)


def _merge(o, l1, og, lg, empty) -> None:
    """Merge part (og, lg) into (o, l1) in place by log-sum-exp; rows in `empty` saw no key."""
    lg = lg.masked_fill_(empty, -math.inf)  # the op's own output: safe to overwrite
    merged = torch.logaddexp(l1, lg)
    o.mul_(l1.sub_(merged).exp_()[..., None].to(o.dtype))
    o.addcmul_(og, lg.sub_(merged).exp_()[..., None].to(o.dtype))
    l1.copy_(merged)


def compact_kernel(
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    *,
    window: int,
    kept: KeptSet | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, S, D]
    """The aligned training layout only (queries and keys at positions 0..S-1), without
    dropout; `select_kernel` sends every other call elsewhere."""
    B, H, S, D = q.shape
    # attention-probability dropout would need the full probability tiles
    kept = require_training_layout("compact", q, k, kept, dropout_p)
    require_window(window)
    if k.shape[1] != H:  # expand outside the Function (BSHD layout): autograd sums the groups
        k, v = _expand_kv(k, H), _expand_kv(v, H)
    plan = kept.window_cache(
        ("compact", window, q.dtype, q.device), lambda: _build_plan(kept, window, q.dtype)
    )
    return _CompactAttention.apply(q, k, v, plan)


def _expand_kv(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, H, S, D] view of [B, S, H, D] storage; head h uses kv head
    h // (H / Hkv), as repeat_interleave."""
    B, Hkv, S, D = x.shape
    xs = x.transpose(1, 2)[:, :, :, None].expand(B, S, Hkv, H // Hkv, D)
    return xs.reshape(B, S, H, D).transpose(1, 2)
