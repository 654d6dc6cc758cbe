"""LayerNorm (NeoX) and RMSNorm (Llama), replicated on every tensor-parallel rank."""

from __future__ import annotations

import torch
from torch import nn

from megatron import fused_kernels
from megatron.parallel.layers import REPLICATED, DeclaresParams, ParamSpec

_NORM_SPECS = {"weight": ParamSpec(REPLICATED, "ones"), "bias": ParamSpec(REPLICATED, "zeros")}


class LayerNorm(nn.LayerNorm, DeclaresParams):
    fusion = False  # config `layernorm_fusion`: the fused-kernel dispatch instead of F.layer_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusion:
            return fused_kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)

    def param_specs(self) -> dict[str, ParamSpec]:
        return dict(_NORM_SPECS)


class RMSNorm(nn.Module, DeclaresParams):
    def __init__(self, dim: int, eps: float, fusion: bool = False) -> None:
        super().__init__()
        self.eps, self.fusion = eps, fusion
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        # The eager math (fp32 normalisation, as Llama) is fused_kernels.reference.rms_norm.
        if self.fusion:
            return fused_kernels.rms_norm(x, self.weight, self.eps)
        return fused_kernels.reference.rms_norm(x, self.weight, self.eps)

    def param_specs(self) -> dict[str, ParamSpec]:
        return dict(_NORM_SPECS)


def build_norm(
    kind: str,
    dim: int,
    eps: float,
    bias: bool,
    layernorm_fusion: bool = False,
    rmsnorm_fusion: bool = False,
) -> nn.Module:
    """The config's norm; the fusion flag of the other kind is ignored (as in NeoX)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, fusion=rmsnorm_fusion)
    norm = LayerNorm(dim, eps=eps, bias=bias)
    norm.fusion = layernorm_fusion
    return norm
