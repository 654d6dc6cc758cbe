"""Self-attention: projections + rotary + one pluggable inner kernel.

The kernel decides which (query, key) pairs are kept; full attention, StreamingLLM and SepLLM
differ only in the kernel and the per-batch kept set passed to it, never in this module.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.model.rotary import apply_rotary
from megatron.parallel.layers import SINGLE, ColumnParallelLinear, RowParallelLinear, TensorParallel
from megatron.sepllm.info import KeptSet
from megatron.sepllm.kernels import AttentionKernel


class SelfAttention(nn.Module):
    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        bias: bool,
        attention_dropout: float,
        tp: TensorParallel = SINGLE,
        rope_fusion: bool = False,
        qkv_bias: bool | None = None,  # None: `bias` (Qwen2: q/k/v biased, output not)
    ) -> None:
        super().__init__()
        # Tensor parallelism splits whole heads (query and key/value heads alike).
        self.heads, self.kv_heads = tp.split(heads, "heads"), tp.split(kv_heads, "kv heads")
        self.head_dim = hidden // heads
        # One fused projection laid out as [q (H*D) | k (Hkv*D) | v (Hkv*D)] (this rank's heads);
        # its layout knows the parts, so sharding and export split q, k and v separately.
        parts = (heads * self.head_dim, kv_heads * self.head_dim, kv_heads * self.head_dim)
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.qkv = ColumnParallelLinear(hidden, sum(parts), qkv_bias, tp, parts=parts)
        self.dense = RowParallelLinear(heads * self.head_dim, hidden, bias, tp)
        self.attention_dropout = attention_dropout
        self.rope_fusion = rope_fusion  # config `rope_fusion`: rotary through the fused dispatch

    def project(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        rope: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin [S, R] or [B, S, R]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [B,H,S,D], k / v [B,Hkv,S,D]
        b, s, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        q = q.view(b, s, self.heads, d).transpose(1, 2)  # [B, H, S, D]
        k = k.view(b, s, self.kv_heads, d).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        if rope is not None:
            fuse = self.rope_fusion
            q, k = apply_rotary(q, *rope, fusion=fuse), apply_rotary(k, *rope, fusion=fuse)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,  # [B, H, Sq, D]
        k: torch.Tensor,  # [B, Hkv, Sk, D]: the step's keys, or a cache's plus the step's
        v: torch.Tensor,
        kernel: AttentionKernel,
        window: int,
        kept: KeptSet | None,
    ) -> torch.Tensor:  # [B, Sq, hidden]
        b, _, s, d = q.shape
        p = self.attention_dropout if self.training else 0.0
        out = kernel(q, k, v, window=window, kept=kept, dropout_p=p)  # [B, H, Sq, D]
        return self.dense(out.transpose(1, 2).reshape(b, s, self.heads * d))

    def forward(
        self,
        x: torch.Tensor,  # [B, S, hidden]
        rope: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin [S, R] or [B, S, R]
        kernel: AttentionKernel,
        window: int,
        kept: KeptSet | None,
    ) -> torch.Tensor:  # [B, S, hidden]
        q, k, v = self.project(x, rope)
        return self.attend(q, k, v, kernel, window, kept)
