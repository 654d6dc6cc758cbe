"""LayerNorm (NeoX) and RMSNorm (Llama), replicated on every tensor-parallel rank."""

from __future__ import annotations

import torch
from torch import nn

from megatron.parallel.layers import REPLICATED, DeclaresParams, ParamSpec

_NORM_SPECS = {"weight": ParamSpec(REPLICATED, "ones"), "bias": ParamSpec(REPLICATED, "zeros")}


class LayerNorm(nn.LayerNorm, DeclaresParams):
    def param_specs(self) -> dict[str, ParamSpec]:
        return dict(_NORM_SPECS)


class RMSNorm(nn.Module, DeclaresParams):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        # Normalise in fp32 as Llama does, then cast back: bf16 variance loses precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def param_specs(self) -> dict[str, ParamSpec]:
        return dict(_NORM_SPECS)


def build_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    return LayerNorm(dim, eps=eps, bias=bias)
