"""Feed-forward blocks: GELU MLP (NeoX) and SwiGLU (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.parallel.layers import SINGLE, ColumnParallelLinear, RowParallelLinear, TensorParallel


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(hidden, ffn, bias, tp)
        self.down = RowParallelLinear(ffn, hidden, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.down(F.gelu(self.up(x)))


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.gate = ColumnParallelLinear(hidden, ffn, bias, tp)
        self.up = ColumnParallelLinear(hidden, ffn, bias, tp)
        self.down = RowParallelLinear(ffn, hidden, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.down(F.silu(self.gate(x)) * self.up(x))


def build_mlp(
    activation: str, hidden: int, ffn: int, bias: bool, tp: TensorParallel = SINGLE
) -> nn.Module:
    cls = SwiGLUMLP if activation == "swiglu" else GeluMLP
    return cls(hidden, ffn, bias, tp)
