"""Compact SepLLM kernel: exact attention over the kept set without any S x S tensor.

The kept keys of query i split into two disjoint parts:

  window = {j : i - w < j <= i}
  far    = initial keys and separators with j <= i - w (initial keys come before every
           separator, so one sorted compact list [B, a + M] holds both)

The window part is block-local: queries are cut into blocks of `bs`; block c attends to its own
block and the `nb = ceil((w-1)/bs)` blocks before it, all in one batched flash call
([C, H, bs, (nb+1)*bs] tiles). Its keys are an overlapping as_strided view of the zero-padded
K / V (no gathered copy), and its queries a strided view of Q. The far part runs over the
compact [B, H, a + M, D] keys with a causal tiling: query group g only sees the far keys that
are at least w before its last query, so the cost is about half the S x M rectangle.

The two parts are merged by log-sum-exp. The gradient is exact with one trick: the flash
backward of each part is called with the *merged* output and log-sum-exp, so each part's
probabilities are its share of the global softmax (as in ring attention). The CPU flash op's
logsumexp has no autograd, hence the custom autograd.Function (over q, k, v directly, so
no autograd graph of gathers / pads / cats; the window-part key gradients are folded back from
the overlapping blocks with nb adds).

Cost grows with the pairs computed: S * (nb+1) * bs + about S * M / 2, against kept
pairs of about S * (a + w) + S * M / 2 and S^2 / 2 for causal attention.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.sepllm.info import SepInfo
from megatron.sepllm.kernels.causal import causal_kernel

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

    bs: int  # query block of the window part
    nb: int  # previous blocks each block attends to
    C: int  # number of query blocks (S padded up to C * bs)
    mask1: torch.Tensor  # [C, 1, bs, (nb+1)*bs] float 0 / -inf (same for every batch row)
    far_pos: torch.Tensor | None  # [B, M] long: initial keys then separators, clamped to S - 1
    groups: list[tuple[int, int, int, torch.Tensor, torch.Tensor]]  # (g0, g1, m, mask, empty)
    M: int  # width of the compact far keys actually used (max over groups)


def block_size(window: int) -> int:
    """Query block of the window part: the window, but at least 32 so tiles stay efficient."""
    return max(window, 32)


def _local_mask(S: int, window: int, bs: int, nb: int, C: int, dtype, dev):  # noqa: ANN001
    i = (torch.arange(C, device=dev)[:, None] * bs + torch.arange(bs, device=dev)[None, :])[
        ..., None
    ]  # [C, bs, 1] query positions
    t = torch.arange((nb + 1) * bs, device=dev)
    p = torch.arange(C, device=dev)[:, None, None] * bs - nb * bs + t[None, None, :]  # [C, 1, T]
    keep = (p >= 0) & (p <= i) & (i - p < window) & (p < S)  # [C, bs, T]
    zero = torch.zeros((), dtype=dtype, device=dev)
    mask = torch.where(keep, zero, torch.full((), -math.inf, dtype=dtype, device=dev))
    return mask[:, None].contiguous()


def _far_keys(info: SepInfo) -> torch.Tensor:
    """[B, a + M] positions of the initial keys then the separators; S marks "no key".

    Initial keys come before every separator (separators are outside and after the initial
    range), so the row stays sorted.
    """
    S, a, dev = info.seq_len, info.init_tokens, info.device
    parts = []
    if a > 0:
        pi = info.init_start[:, None] + torch.arange(a, device=dev)[None, :]  # [B, a]
        parts.append(pi.clamp(max=S))
    parts.append(info.sep_pos)
    return torch.cat(parts, dim=1)


def _far_groups(info: SepInfo, window: int, dtype: torch.dtype):
    """Causal tiling of the far part (initial keys and separators at least w back).

    Returns (far_pos, groups, M): groups of (g0, g1, m, mask [B, 1, g1-g0, m] float 0 / -inf,
    empty [B, 1, g1-g0] bool for queries that see no far key: their part logsumexp must be
    -inf; the flash op returns 0 for an all-masked row).
    """
    S, dev = info.seq_len, info.device
    groups: list = []
    pos = _far_keys(info)  # [B, Mt], sorted, padded with S
    if pos.shape[1] == 0:
        return None, groups, 0
    G = max(SEP_QUERY_GROUP, -(-S // SEP_MAX_GROUPS))
    limits = (torch.arange(G - 1, S + G - 1, G).clamp(max=S - 1) - window).to(dev)
    limits = limits[None, :].expand(pos.shape[0], -1).contiguous()
    widths = torch.searchsorted(pos, limits, right=True).max(dim=0).values.tolist()
    zero = torch.zeros((), dtype=dtype, device=dev)
    neg = torch.full((), -math.inf, dtype=dtype, device=dev)
    for g, m in enumerate(widths):
        if m == 0:
            continue  # no query of this group sees a far key
        g0, g1 = g * G, min(S, (g + 1) * G)
        i = torch.arange(g0, g1, device=dev)  # [G]
        keep = pos[:, None, :m] <= (i - window)[None, :, None]  # [B, G, m]
        empty = ~keep.any(dim=-1)[:, None]  # [B, 1, G]
        groups.append((g0, g1, m, torch.where(keep, zero, neg)[:, None], empty))
    M = max(widths)
    return pos[:, :M].clamp(max=S - 1).contiguous(), groups, M


def _build_plan(info: SepInfo, window: int, dtype: torch.dtype) -> _Plan:
    S = info.seq_len
    bs = block_size(window)
    nb = -(-(window - 1) // bs)  # ceil((w-1)/bs): previous blocks a window can reach
    C = -(-S // bs)
    mask1 = _local_mask(S, window, bs, nb, C, dtype, info.device)
    far_pos, groups, M = _far_groups(info, window, dtype)
    return _Plan(bs, nb, C, mask1, far_pos, groups, M)


def _qblocks(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[H, S, D] -> [C, H, bs, D] strided view (zero-padded copy only when S % bs != 0)."""
    H, S, D = x.shape
    Sp = plan.C * plan.bs
    if Sp != S or not x.is_contiguous():
        x = F.pad(x, (0, 0, 0, Sp - S)).contiguous()
    return x.as_strided((plan.C, H, plan.bs, D), (plan.bs * D, Sp * D, D, 1))


def _lse_blocks(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[H, S] -> [C, H, bs]."""
    H, S = x.shape
    Sp = plan.C * plan.bs
    x = F.pad(x, (0, Sp - S)).contiguous()
    return x.view(H, plan.C, plan.bs).transpose(0, 1).contiguous()


def _pad_keys(x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[H, S, D] -> [H, (nb + C) * bs, D]: nb zero blocks before, zeros after S."""
    H, S, D = x.shape
    bs, nb, C = plan.bs, plan.nb, plan.C
    xp = x.new_empty(H, (nb + C) * bs, D)
    xp[:, : nb * bs].zero_()
    xp[:, nb * bs : nb * bs + S].copy_(x)
    xp[:, nb * bs + S :].zero_()
    return xp


def _kblocks(xp: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """[H, (nb + C) * bs, D] padded -> [C, H, (nb+1)*bs, D]: overlapping strided view."""
    H, L, D = xp.shape
    bs = plan.bs
    return xp.as_strided((plan.C, H, (plan.nb + 1) * bs, D), (bs * D, L * D, D, 1))


def _from_qblocks(x: torch.Tensor, S: int) -> torch.Tensor:
    """[C, H, bs, D] -> [H, S, D] view (strided)."""
    C, H, bs, D = x.shape
    return x.transpose(0, 1).reshape(H, C * bs, D)[:, :S]


class _CompactAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):  # noqa: ANN001
        B, H, S, D = q.shape
        out = torch.empty(B, H, S, D, dtype=torch.float32)
        lse = torch.empty(B, H, S, dtype=torch.float32)
        kps, vps = [], []
        for b in range(B):
            kp, vp = _pad_keys(k[b], plan), _pad_keys(v[b], plan)
            kps.append(kp)
            vps.append(vp)
            o1, l1 = _flash(
                _qblocks(q[b], plan), _kblocks(kp, plan), _kblocks(vp, plan), attn_mask=plan.mask1
            )
            out[b] = _from_qblocks(o1, S)
            lse[b] = l1.transpose(0, 1).reshape(H, -1)[:, :S]
        k_far = v_far = None
        if plan.groups:
            idx = plan.far_pos[:, None, :, None].expand(B, H, plan.M, D)
            k_far, v_far = k.gather(2, idx), v.gather(2, idx)  # [B, H, M, D]
            for g0, g1, m, mask, empty in plan.groups:
                og, lg = _flash(q[:, :, g0:g1], k_far[:, :, :m], v_far[:, :, :m], attn_mask=mask)
                lg = lg.float().masked_fill_(empty, -math.inf)
                l1 = lse[:, :, g0:g1]
                merged = torch.logaddexp(l1, lg)
                o = out[:, :, g0:g1]
                o.mul_(torch.exp(l1 - merged)[..., None])
                o.add_(og * torch.exp(lg - merged)[..., None])
                l1.copy_(merged)
        out = out.to(q.dtype)
        ctx.plan = plan
        ctx.save_for_backward(q, k_far, v_far, out, lse, *kps, *vps)
        return out

    @staticmethod
    def backward(ctx, d_out):  # noqa: ANN001
        q, k_far, v_far, out, lse, *kvp = ctx.saved_tensors
        plan: _Plan = ctx.plan
        B, H, S, D = q.shape
        bs, nb, C = plan.bs, plan.nb, plan.C
        d_out = d_out.contiguous()
        dq = torch.empty_like(q)
        dk = torch.empty_like(q)
        dv = torch.empty_like(q)
        for b in range(B):
            # Each part's backward with the merged out / lse gives its share of the gradient.
            dq1, dk1, dv1 = _flash_bwd(
                _qblocks(d_out[b], plan),
                _qblocks(q[b], plan),
                _kblocks(kvp[b], plan),
                _kblocks(kvp[B + b], plan),
                _qblocks(out[b], plan),
                _lse_blocks(lse[b], plan),
                0.0,
                False,
                attn_mask=plan.mask1,
            )
            dq[b] = _from_qblocks(dq1, S)
            for dx1, dx in ((dk1, dk), (dv1, dv)):
                # key block t of query block c is position block c - nb + t
                d5 = dx1.view(C, H, nb + 1, bs, D)
                if C * bs == S:
                    acc = dx[b]
                    acc.view(H, C, bs, D).copy_(d5[:, :, nb].transpose(0, 1))  # own block
                else:
                    acc = d5[:, :, nb].transpose(0, 1).reshape(H, C * bs, D)
                acc5 = acc.view(H, C, bs, D)
                for t in range(nb):
                    sh = nb - t  # block c - sh
                    if sh < C:
                        acc5[:, : C - sh].add_(d5[sh:, :, t].transpose(0, 1))
                if C * bs != S:
                    dx[b] = acc[:, :S]
        if plan.groups:
            dk_far = torch.zeros_like(k_far)
            dv_far = torch.zeros_like(v_far)
            for g0, g1, m, mask, _ in plan.groups:
                dqg, dkg, dvg = _flash_bwd(
                    d_out[:, :, g0:g1],
                    q[:, :, g0:g1],
                    k_far[:, :, :m],
                    v_far[:, :, :m],
                    out[:, :, g0:g1],
                    lse[:, :, g0:g1],
                    0.0,
                    False,
                    attn_mask=mask,
                )
                dq[:, :, g0:g1] += dqg
                dk_far[:, :, :m] += dkg
                dv_far[:, :, :m] += dvg
            idx = plan.far_pos[:, None, :, None].expand(B, H, plan.M, D)
            dk.scatter_add_(2, idx, dk_far)
            dv.scatter_add_(2, idx, dv_far)
        return dq, dk, dv, None


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
        return causal_kernel(q, k, v, window=window, info=None, dropout_p=dropout_p)
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
    return _CompactAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan)
