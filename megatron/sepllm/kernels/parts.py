"""Attention over one *part* of a query's kept keys, and that part's exact backward.

The compact kernel splits each query's kept keys into disjoint parts, runs each part with
`part_forward` (which also returns the part's log-sum-exp) and merges the parts by
log-sum-exp. `part_backward` is called with the *merged* output and log-sum-exp: then each
part's probabilities are its share of the global softmax, so the gradients of all parts add
up to the exact gradient (the ring-attention identity).

Backends, picked from the device (`BACKEND_OVERRIDE` forces one, for tests):
  cpu     torch's fused CPU flash-attention op (`_scaled_dot_product_flash_attention_for_cpu`
          and its backward), which takes an additive mask and returns the log-sum-exp
  cuda    the memory-efficient attention op (additive bias, log-sum-exp, explicit backward)
  math    explicit matmuls: any device, and an independent check of the fused backends

Shapes: q [N, H, Sq, D], k / v [N, H, Sk, D] (any strides with a contiguous last dim),
mask additive [N or 1, 1, Sq, Sk] of 0 / -inf in q's dtype; lse [N, H, Sq] float32, with
-inf where a row keeps no key on the math backend (the fused ops give 0 there; callers that
can have such rows mask them).
"""

from __future__ import annotations

import math

import torch

BACKEND_OVERRIDE: str | None = None


def backend_for(device: torch.device) -> str:
    if BACKEND_OVERRIDE is not None:
        return BACKEND_OVERRIDE
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return "cuda"
    return "math"


def part_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:  # out [N, H, Sq, D], lse [N, H, Sq] float32
    backend = backend_for(q.device)
    if backend == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask
        )
        return out, lse
    if backend == "cuda":
        bias = mask.expand(q.shape[0], q.shape[1], -1, -1)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)
        return out, lse[..., : q.shape[2]].float()
    return _math_forward(q, k, v, mask)


def part_backward(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,  # merged output of all parts
    lse: torch.Tensor,  # merged log-sum-exp of all parts
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # dq, dk, dv: this part's share
    backend = backend_for(q.device)
    if backend == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out, q, k, v, out, lse, 0.0, False, attn_mask=mask
        )
    if backend == "cuda":
        return _cuda_backward(d_out, q, k, v, out, lse, mask)
    return _math_backward(d_out, q, k, v, out, lse, mask)


def _cuda_backward(d_out, q, k, v, out, lse, mask):  # see part_backward
    # The op expects the log-sum-exp it produced: padded to a multiple of 32 queries.
    n, h, sq = lse.shape
    lse_p = lse.new_zeros(n, h, -(-sq // 32) * 32)
    lse_p[..., :sq] = lse
    zero = torch.zeros((), dtype=torch.int64, device=q.device)  # philox state: no dropout
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        d_out.contiguous(),
        q,
        k,
        v,
        mask.expand(q.shape[0], q.shape[1], -1, -1),
        out,
        lse_p,
        zero,
        zero,
        0.0,
        [True, True, True, False],
    )
    return dq, dk, dv


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    return (q.float() @ k.float().transpose(-1, -2)) * scale + mask.float()  # [N, H, Sq, Sk]


def _math_forward(q, k, v, mask):  # see part_forward
    s = _scores(q, k, mask)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that keep nothing
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0.0)[..., None])
    return (p @ v.float()).to(q.dtype), lse


def _math_backward(d_out, q, k, v, out, lse, mask):  # see part_backward
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.exp(_scores(q, k, mask) - lse[..., None])  # this part's share of the softmax
    do = d_out.float()
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.float().transpose(-1, -2)
    ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
    dq = (ds @ k.float()) * scale
    dk = (ds.transpose(-1, -2) @ q.float()) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
