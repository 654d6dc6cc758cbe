"""Feed-forward blocks: GELU MLP (NeoX) and SwiGLU (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, ffn, bias=bias)
        self.down = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.down(F.gelu(self.up(x)))


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=bias)
        self.up = nn.Linear(hidden, ffn, bias=bias)
        self.down = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden]
        return self.down(F.silu(self.gate(x)) * self.up(x))


def build_mlp(activation: str, hidden: int, ffn: int, bias: bool) -> nn.Module:
    return SwiGLUMLP(hidden, ffn, bias) if activation == "swiglu" else GeluMLP(hidden, ffn, bias)
