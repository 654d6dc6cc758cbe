"""Autograd wrappers shared by the Triton kernels and the CUDA extension.

A kernel backend is any object with `rope_apply(xs, cos, sin, backward)`,
`norm_forward(x, w, b, eps, rms, out_dtype)` and `norm_backward(dy, x, w, mean, rstd, rms,
has_bias)` working on the shapes documented in `triton_kernels.py`; these wrappers do the
layout work (views, broadcasting, flattening rows) once for both.
"""

from __future__ import annotations

from typing import Any

import torch


def _tables(t: torch.Tensor, bsz: int) -> torch.Tensor:
    # [S, R] or [B, S, R] -> a [B, S, R] view (stride 0 over a broadcast batch), no copy.
    return (t if t.dim() == 3 else t.unsqueeze(0)).expand(bsz, t.shape[-2], t.shape[-1])


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: Any
    ) -> torch.Tensor:
        # x [B, H, S, D] is read in [B, S, H, D] order through its strides; the output is
        # [B, S, H, D] storage returned as a [B, H, S, D] view, exactly like the reference.
        cos3, sin3 = _tables(cos, x.shape[0]), _tables(sin, x.shape[0])
        ctx.save_for_backward(cos3, sin3)
        ctx.kernels = kernels
        return kernels.rope_apply(x.transpose(1, 2), cos3, sin3, False).transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos3, sin3 = ctx.saved_tensors
        dx = ctx.kernels.rope_apply(dy.transpose(1, 2), cos3, sin3, True).transpose(1, 2)
        return dx, None, None, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    # [..., N] -> [M, N] with unit column stride (a view when the input allows it).
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
        rms: bool,
        kernels: Any,
    ) -> torch.Tensor:
        x2 = _rows(x)
        # The reference's output dtype: RMSNorm multiplies `weight * x_normed.to(x.dtype)`
        # (type promotion), LayerNorm returns the input dtype.
        out_dtype = torch.result_type(weight, x) if rms else x.dtype
        y, mean, rstd = kernels.norm_forward(x2, weight, bias, eps, rms, out_dtype)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.kernels, ctx.shape = rms, bias is not None, kernels, x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = ctx.kernels.norm_backward(
            _rows(dy), x2, weight, mean, rstd, ctx.rms, ctx.has_bias
        )
        db = db.to(ctx.bias_dtype) if db is not None else None
        return dx.view(ctx.shape), dw.to(weight.dtype), db, None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: Any) -> torch.Tensor:
    return RopeFunction.apply(x, cos, sin, kernels)


def norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    kernels: Any,
) -> torch.Tensor:
    return NormFunction.apply(x, weight, bias, eps, rms, kernels)
