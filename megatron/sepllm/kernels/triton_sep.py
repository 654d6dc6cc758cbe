"""Triton SepLLM kernel: one fused pass per query block over the kept keys, fwd and bwd.

The kept keys of query i split into two disjoint sources (as in compact.py):

  far     the initial tokens and the separators with key_pos <= i - w: one sorted per-row
          index list `far_pos [B, Mf]` (initial positions first, then separators), built once
          per batch on the KeptSet. Validity is a monotone staircase in i, so query block n
          walks only the prefix `far_cnt[b, n]` of the list (the keys valid for its last query)
  window  the banded local keys i - w < j <= i: the key blocks overlapping
          [q0 - w + 1, q0 + BLOCK_M)

Each query block walks both sources with one online softmax (fp32 statistics, exp2), so
there is no log-sum-exp merge and no S x S tensor: the work is about S * (w + BLOCK) pairs
plus half the S x Mf rectangle, against S^2 / 2 for causal attention. Leading pads (left
padding) are ordinary keys of the window, initial tokens start at init_start, exactly as the
dense reference (dense.py) treats them; every query keeps at least itself, so no row is empty.

Backward (FlashAttention-2 style, recomputing probabilities from the saved log-sum-exp):
  dq        one program per query block over the same two sources
  dk / dv   window: one program per key block over the queries that see it through the
            window (i in [j, j + w)); far: one program per block of the far list over the
            queries i >= key_pos + w, its gradients added to the window's at the gathered
            positions (positions are distinct within a row, so no atomics are needed)
GQA: a kv head's dk / dv program loops over the H / Hkv query heads that share it.

Loads use the tensors' dtypes (fp32, bf16, fp16); dot products accumulate in fp32 (fp32
inputs with IEEE precision, not TF32, so the result matches the fp32 reference). Runs on CUDA,
and on CPU under TRITON_INTERPRET=1 (the tests; there the dots multiply the same rounded
operands converted to fp32, since the interpreter's bf16 tl.dot is wrong in Triton 3.7).
Tile sizes are untuned (no GPU was lent when this was written): `BLOCK_M` / `BLOCK_N` are
module constants for the benchmark to tune.

Contract: the aligned training layout only, no dropout (select_kernel routes the rest).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM  # select_kernel's too
from megatron.sepllm.kernels.training_layout import require_training_layout, require_window

BLOCK_M = 64  # queries per program
BLOCK_N = 64  # keys per inner step (window blocks and far-list blocks)
NUM_WARPS = 4
NUM_STAGES = 2
LOG2E = 1.4426950408889634
FAR_NONE = 2**30  # far-list slot without a key: fails key_pos <= i - w for every query
_FAR_NONE = tl.constexpr(FAR_NONE)  # the same, readable inside @triton.jit functions


@triton.jit
def _load_rows(base, rows, row_stride, D, row_ok, BLOCK_D: tl.constexpr):
    """[len(rows), BLOCK_D] tile of rows `rows` (masked rows and dims beyond D read 0)."""
    d = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None].to(tl.int64) * row_stride + d[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (the CPU interpreter only, whose bf16 tl.dot is
    wrong in Triton 3.7): multiply the same rounded operands as fp32, which is exact for
    bf16 / fp16 products, so the interpreter checks the GPU's numerics up to summation order."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over a key tile; scores in log2 units."""
    s = _mm(q, tl.trans(k), PREC, UPCAST) * qk_scale  # [BM, BN]
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite: no -inf - -inf
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _dq_step(dq, q, do, k, v, lse, delta, keep, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dq += dS k over one key tile (dS = P * (dP - delta)); scale applied by the caller."""
    s = _mm(q, tl.trans(k), PREC, UPCAST) * qk_scale
    p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
    dp = _mm(do, tl.trans(v), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    return dq + _mm(ds.to(k.dtype), k, PREC, UPCAST)


@triton.jit
def _dkv_step(
    dk, dv, q, do, k, v, lse, delta, keep, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr
):
    """dk += dS^T q, dv += P^T dO over one query tile (dk's scale applied by the caller)."""
    s = _mm(q, tl.trans(k), PREC, UPCAST) * qk_scale  # [BM, BN]
    p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
    dv += _mm(tl.trans(p).to(do.dtype), do, PREC, UPCAST)
    dp = _mm(do, tl.trans(v), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    dk += _mm(tl.trans(ds).to(q.dtype), q, PREC, UPCAST)
    return dk, dv


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, far_ptr, cnt_ptr,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    S, H, D, W, MF, NQB, GROUP, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kh = h // GROUP
    q0 = n * BLOCK_M
    i = q0 + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr + b.to(tl.int64) * sqb + h * sqh, i, sqs, D, i < S, BLOCK_D)
    k_base = k_ptr + b.to(tl.int64) * skb + kh * skh
    v_base = v_ptr + b.to(tl.int64) * svb + kh * svh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.load(cnt_ptr + b * NQB + n)  # far keys valid for the block's last query
    for f0 in range(0, cnt, BLOCK_N):
        f = f0 + tl.arange(0, BLOCK_N)
        pos = tl.load(far_ptr + b * MF + f, mask=f < cnt, other=_FAR_NONE)
        ok = pos < S
        k = _load_rows(k_base, pos, sks, D, ok, BLOCK_D)
        v = _load_rows(v_base, pos, svs, D, ok, BLOCK_D)
        keep = pos[None, :] <= i[:, None] - W
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, PREC, UPCAST)
    lo = tl.maximum(q0 - W + 1, 0) // BLOCK_N * BLOCK_N
    for j0 in range(lo, tl.minimum(q0 + BLOCK_M, S), BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, j, sks, D, j < S, BLOCK_D)
        v = _load_rows(v_base, j, svs, D, j < S, BLOCK_D)
        keep = (j[None, :] <= i[:, None]) & (i[:, None] - j[None, :] < W) & (j[None, :] < S)
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, keep, qk_scale, PREC, UPCAST)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # rows past S only
    out = acc / l_i[:, None]
    d = tl.arange(0, BLOCK_D)
    o_ptrs = o_ptr + b.to(tl.int64) * sob + h * soh + i[:, None].to(tl.int64) * sos + d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(i[:, None] < S) & (d[None, :] < D))
    tl.store(lse_ptr + bh.to(tl.int64) * S + i, m_i + tl.log2(l_i), mask=i < S)


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, far_ptr, cnt_ptr,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
    S, H, D, W, MF, NQB, GROUP, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kh = h // GROUP
    q0 = n * BLOCK_M
    i = q0 + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr + b.to(tl.int64) * sqb + h * sqh, i, sqs, D, i < S, BLOCK_D)
    do = _load_rows(do_ptr + b.to(tl.int64) * sdb + h * sdh, i, sds, D, i < S, BLOCK_D)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * S + i, mask=i < S, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S + i, mask=i < S, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + kh * skh
    v_base = v_ptr + b.to(tl.int64) * svb + kh * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cnt = tl.load(cnt_ptr + b * NQB + n)
    for f0 in range(0, cnt, BLOCK_N):
        f = f0 + tl.arange(0, BLOCK_N)
        pos = tl.load(far_ptr + b * MF + f, mask=f < cnt, other=_FAR_NONE)
        ok = pos < S
        k = _load_rows(k_base, pos, sks, D, ok, BLOCK_D)
        v = _load_rows(v_base, pos, svs, D, ok, BLOCK_D)
        keep = (pos[None, :] <= i[:, None] - W) & (i[:, None] < S)
        dq = _dq_step(dq, q, do, k, v, lse, delta, keep, qk_scale, PREC, UPCAST)
    lo = tl.maximum(q0 - W + 1, 0) // BLOCK_N * BLOCK_N
    for j0 in range(lo, tl.minimum(q0 + BLOCK_M, S), BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, j, sks, D, j < S, BLOCK_D)
        v = _load_rows(v_base, j, svs, D, j < S, BLOCK_D)
        keep = (j[None, :] <= i[:, None]) & (i[:, None] - j[None, :] < W) & (i[:, None] < S)
        dq = _dq_step(dq, q, do, k, v, lse, delta, keep, qk_scale, PREC, UPCAST)
    d = tl.arange(0, BLOCK_D)
    ptrs = dq_ptr + b.to(tl.int64) * sqb + h * sqh + i[:, None].to(tl.int64) * sqs + d[None, :]
    mask = (i[:, None] < S) & (d[None, :] < D)
    tl.store(ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, far_ptr,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
    S, H, D, W, MF, GROUP, qk_scale, sm_scale,
    FAR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    # FAR: block n of row b's far list (queries i >= key_pos + w); else key block n of the
    # sequence (queries j <= i < j + w). dk / dv: fp32 [B, Hkv, S, D] contiguous.
    n, bkh = tl.program_id(0), tl.program_id(1)
    Hkv = H // GROUP
    b, kh = bkh // Hkv, bkh % Hkv
    if FAR:
        f = n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.load(far_ptr + b * MF + f, mask=f < MF, other=_FAR_NONE)  # key positions
        q_lo = (tl.load(far_ptr + b * MF + n * BLOCK_N) + W) // BLOCK_M * BLOCK_M
        q_hi = S
    else:
        j = n * BLOCK_N + tl.arange(0, BLOCK_N)
        q_lo = n * BLOCK_N // BLOCK_M * BLOCK_M
        q_hi = tl.minimum(n * BLOCK_N + BLOCK_N - 1 + W, S)
    ok = j < S
    k = _load_rows(k_ptr + b.to(tl.int64) * skb + kh * skh, j, sks, D, ok, BLOCK_D)
    v = _load_rows(v_ptr + b.to(tl.int64) * svb + kh * svh, j, svs, D, ok, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):  # the query heads sharing this kv head
        h = kh * GROUP + g
        row = (b * H + h).to(tl.int64) * S
        q_base = q_ptr + b.to(tl.int64) * sqb + h * sqh
        do_base = do_ptr + b.to(tl.int64) * sdb + h * sdh
        for m0 in range(q_lo, q_hi, BLOCK_M):
            i = m0 + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, i, sqs, D, i < S, BLOCK_D)
            do = _load_rows(do_base, i, sds, D, i < S, BLOCK_D)
            lse = tl.load(lse_ptr + row + i, mask=i < S, other=0.0)
            delta = tl.load(delta_ptr + row + i, mask=i < S, other=0.0)
            if FAR:
                keep = (j[None, :] <= i[:, None] - W) & (i[:, None] < S)
            else:
                keep = (j[None, :] <= i[:, None]) & (i[:, None] - j[None, :] < W)
                keep = keep & (i[:, None] < S) & ok[None, :]
            dk, dv = _dkv_step(dk, dv, q, do, k, v, lse, delta, keep, qk_scale, PREC, UPCAST)
    d = tl.arange(0, BLOCK_D)
    off = (bkh.to(tl.int64) * S + j[:, None].to(tl.int64)) * D + d[None, :]
    mask = ok[:, None] & (d[None, :] < D)
    dk = dk * sm_scale
    if FAR:  # after the window launch: add to its gradients (positions distinct per row)
        dk += tl.load(dk_ptr + off, mask=mask, other=0.0)
        dv += tl.load(dv_ptr + off, mask=mask, other=0.0)
    tl.store(dk_ptr + off, dk, mask=mask)
    tl.store(dv_ptr + off, dv, mask=mask)


@dataclass
class _Plan:
    """The far-key index of one batch (per window and query block), shared by all layers."""

    far_pos: torch.Tensor  # [B, MF] int32: initial positions, then separators; FAR_NONE pads
    far_cnt: torch.Tensor  # [B, NQB] int32: far keys valid for each query block's last query
    block_m: int

    @property
    def mf(self) -> int:
        return self.far_pos.shape[1]


def build_plan(kept: KeptSet, window: int, block_m: int = BLOCK_M) -> _Plan:
    """Far list and per-query-block prefix lengths; one sort-free pass (kept.sep_pos is sorted
    and every initial position precedes every separator outside the initial range)."""
    S, a, dev = kept.kv_len, kept.init_tokens, kept.device
    parts = []
    if a > 0:
        init = kept.init_start[:, None] + torch.arange(a, device=dev)[None, :]  # [B, a]
        parts.append(torch.where(init < S, init, FAR_NONE))
    parts.append(torch.where(kept.sep_pos < S, kept.sep_pos, FAR_NONE))  # pads are S
    far = torch.cat(parts, dim=1)  # [B, a + M]
    if far.shape[1] == 0:  # no initial tokens and no separator: one empty slot
        far = torch.full((kept.batch_size, 1), FAR_NONE, dtype=torch.long, device=dev)
    nqb = -(-S // block_m)
    last = (torch.arange(nqb, device=dev) * block_m + block_m - 1).clamp(max=S - 1)
    limits = (last - window)[None, :].expand(far.shape[0], -1).contiguous()  # [B, NQB]
    cnt = torch.searchsorted(far.contiguous(), limits, right=True)
    return _Plan(far.to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous(), block_m)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, sequence) strides of a [B, H, S, D] tensor with a unit last stride."""
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim densely: copy only if its stride is not 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q: torch.Tensor, plan: _Plan) -> dict[str, object]:
    """Launch constants shared by the three kernels."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return dict(
        BLOCK_M=plan.block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),  # tl.dot needs K >= 16
        PREC="ieee" if q.dtype == torch.float32 or interpret else "tf32",  # fp32: not TF32
        UPCAST=interpret,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )


def _forward(q, k, v, plan: _Plan, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, S, D] (q's layout), lse [B, H, S] fp32 in log2 units."""
    B, H, S, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    nqb = plan.far_cnt.shape[1]
    qk_scale = LOG2E / math.sqrt(D)
    _fwd_kernel[(nqb, B * H)](
        q, k, v, out, lse, plan.far_pos, plan.far_cnt,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        S, H, D, window, plan.mf, nqb, H // k.shape[1], qk_scale,
        **_meta(q, plan),
    )  # fmt: skip
    return out, lse


def _backward(d_out, q, k, v, out, lse, plan: _Plan, window: int):
    """(dq, dk, dv) in the inputs' dtypes; dk / dv accumulate in fp32 [B, Hkv, S, D]."""
    B, H, S, D = q.shape
    Hkv, group = k.shape[1], H // k.shape[1]
    delta = (d_out.float() * out.float()).sum(-1).contiguous()  # [B, H, S]: rowsum(dO * O)
    dq = torch.empty_like(q)
    dk = torch.empty(B, Hkv, S, D, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    nqb, sm_scale = plan.far_cnt.shape[1], 1.0 / math.sqrt(D)
    qk_scale, meta = LOG2E * sm_scale, _meta(q, plan)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(d_out))
    _dq_kernel[(nqb, B * H)](
        q, k, v, d_out, dq, lse, delta, plan.far_pos, plan.far_cnt, *strides,
        S, H, D, window, plan.mf, nqb, group, qk_scale, sm_scale, **meta,
    )  # fmt: skip
    for far, blocks in ((False, -(-S // BLOCK_N)), (True, -(-plan.mf // BLOCK_N))):
        # The far launch runs after the window launch (same stream) and adds to it.
        _dkv_kernel[(blocks, B * Hkv)](
            q, k, v, d_out, lse, delta, dk, dv, plan.far_pos, *strides,
            S, H, D, window, plan.mf, group, qk_scale, sm_scale, FAR=far, **meta,
        )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _TritonSepAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, window: int):
        out, lse = _forward(q, k, v, plan, window)
        ctx.plan, ctx.window = plan, window
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(_unit_last(d_out), q, k, v, out, lse, ctx.plan, ctx.window)
        return dq, dk, dv, None, None


def runnable_on(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA, or any device's tensors in the CPU
    interpreter (TRITON_INTERPRET=1, read by triton.jit when this module was imported)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_kernel(
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    *,
    window: int,
    kept: KeptSet | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:  # [B, H, S, D]
    """The aligned training layout only, without dropout; `select_kernel` routes the rest."""
    B, H, S, D = q.shape
    kept = require_training_layout("triton", q, k, kept, dropout_p)
    require_window(window)
    if H % k.shape[1] or v.shape != k.shape:
        raise ValueError(f"kv heads must divide query heads, got q {q.shape} k {k.shape}")
    if D > MAX_HEAD_DIM or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"triton kernel: head dim <= {MAX_HEAD_DIM}, fp32 / bf16 / fp16")
    if not runnable_on(q.device):
        raise ValueError(
            "triton kernel: runs on CUDA tensors (or on CPU only with TRITON_INTERPRET=1 set "
            f"before import); got {q.device.type}: use 'compact' or 'auto' there"
        )
    plan = kept.window_cache(
        ("triton", window, BLOCK_M, q.device), lambda: build_plan(kept, window, BLOCK_M)
    )
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return _TritonSepAttention.apply(q, k, v, plan, window)
