"""Triton kernels: rotary embedding and LayerNorm / RMSNorm, forward and backward.

Imported only when `triton` is importable. On a GPU they run compiled; on a CPU they run under
`TRITON_INTERPRET=1` (the tests), slowly but with the same code. All math is fp32 in registers;
loads and stores use the tensors' own dtypes. The autograd wrappers live in `functions.py`,
shared with the CUDA extension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    S,
    H,
    sxb,
    sxs,
    sxh,
    sxd,
    sob,
    sos,
    soh,
    sod,
    scb,
    scs,
    scr,
    HALF: tl.constexpr,
    PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    # One program per (batch, position): its cos / sin row is loaded once for all heads.
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // S, pid % S
    h = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mi = i < HALF
    m = (h < H) & mi
    cb = b * scb + s * scs
    c1 = tl.load(cos_ptr + cb + i * scr, mask=mi, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cb + (i + HALF) * scr, mask=mi, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cb + i * scr, mask=mi, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cb + (i + HALF) * scr, mask=mi, other=0.0).to(tl.float32)
    xb = x_ptr + b * sxb + s * sxs + h * sxh
    ob = out_ptr + b * sob + s * sos + h * soh
    x1 = tl.load(xb + i * sxd, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xb + (i + HALF) * sxd, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose of the rotation (rotation by -theta for NeoX tables)
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # x * cos + rotate_half(x) * sin
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(ob + i * sod, y1.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(ob + (i + HALF) * sod, y2.to(out_ptr.dtype.element_ty), mask=m)
    if PASS > 0:  # partial rotary: the trailing dims pass through unchanged
        p = tl.arange(0, BLOCK_PASS)[None, :]
        mp = (h < H) & (p < PASS)
        v = tl.load(xb + (2 * HALF + p) * sxd, mask=mp, other=0.0)
        tl.store(ob + (2 * HALF + p) * sod, v, mask=mp)


def rope_apply(
    xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> torch.Tensor:
    """xs [B, S, H, D] (any strides), cos / sin [B, S, R] (any strides, stride 0 allowed) ->
    a new contiguous [B, S, H, D] tensor: rotated (or, for `backward`, the gradient's
    transpose-rotated) first R dims, the rest copied."""
    bsz, seq, heads, dim = xs.shape
    rot = cos.shape[-1]
    out = torch.empty((bsz, seq, heads, dim), dtype=xs.dtype, device=xs.device)
    half, pas = rot // 2, dim - rot
    _rope_kernel[(bsz * seq,)](
        xs,
        out,
        cos,
        sin,
        seq,
        heads,
        *xs.stride(),
        *out.stride(),
        *cos.stride(),
        HALF=half,
        PASS=pas,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_PASS=triton.next_power_of_2(max(pas, 1)),
        BACKWARD=backward,
    )
    return out


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    stride_x,
    stride_y,
    N,
    eps,
    RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    m = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        # Round the normalised value to the input dtype first, as the reference does.
        y = w * (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd * w
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=m)
    if not RMS:  # RMSNorm has no mean; its backward never reads the buffer
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_prog,
    RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Each program walks a block of rows and keeps its weight / bias gradient partial sums in
    # registers; the host sums the [programs, N] partials (no atomics, deterministic).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    m = cols < N
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog  # int64 row offsets: large activations
    end = tl.minimum(start + rows_per_prog, M)
    for row in range(start, end):
        x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            xhat = x * rstd
            dw_acc += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
            g = dy * w
            dx = (g - xhat * (tl.sum(g * xhat, axis=0) / N)) * rstd
        else:
            xhat = tl.where(m, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
            g = dy * w
            c1 = tl.sum(g * xhat, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            dx = (g - c1 * xhat - c2) * rstd
            dw_acc += dy * xhat
            db_acc += dy
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid * N + cols, dw_acc, mask=m)
    if HAS_BIAS:
        tl.store(db_ptr + pid * N + cols, db_acc, mask=m)


def _programs(rows: int, device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over, few enough that the partial-sum
    # buffer stays small; under the CPU interpreter a handful.
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


def norm_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    eps: float,
    rms: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, N] with unit column stride -> (y [M, N] of out_dtype, mean [M], rstd [M] fp32)."""
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    _norm_fwd_kernel[(rows,)](
        x,
        w,
        b if b is not None else w,
        y,
        mean,
        rstd,
        x.stride(0),
        y.stride(0),
        n,
        eps,
        RMS=rms,
        HAS_BIAS=b is not None,
        BLOCK_N=triton.next_power_of_2(n),
    )
    return y, mean, rstd


def norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dx [M, N] in x's dtype, dw [N] and db [N] in fp32; db None without bias)."""
    rows, n = x.shape
    progs = _programs(rows, x.device)
    per = triton.cdiv(rows, progs)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw = torch.empty((progs, n), dtype=torch.float32, device=x.device)
    db = torch.empty((progs, n), dtype=torch.float32, device=x.device) if has_bias else dw
    _norm_bwd_kernel[(progs,)](
        dy,
        x,
        w,
        mean,
        rstd,
        dx,
        dw,
        db,
        dy.stride(0),
        x.stride(0),
        dx.stride(0),
        rows,
        n,
        per,
        RMS=rms,
        HAS_BIAS=has_bias,
        BLOCK_N=triton.next_power_of_2(n),
    )
    return dx, dw.sum(0), db.sum(0) if has_bias else None
