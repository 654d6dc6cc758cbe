"""Megatron-style tensor-parallel layers. At degree 1 each is exactly the plain layer.

`TensorParallel` describes this rank's tensor-parallel group; layers take it at construction
(no globals). Column-parallel layers split output features, row-parallel layers split input
features and all-reduce their output; the vocabulary is split for the embedding, the head and
the cross-entropy, so full logits are never gathered.

Every module that owns parameters declares, per parameter, how it is split across ranks (a
`Layout`) and how it is initialised (an init role): `ParamSpec`s from `param_specs()`.
Sharding, resharding, export and init read these declarations (`param_layouts`,
`param_init_roles`); a parameter whose module declares nothing is an error, never silently
replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.parallel.cross_entropy import chunked_cross_entropy


@dataclass(frozen=True)
class TensorParallel:
    size: int = 1
    rank: int = 0
    group: object | None = None  # torch.distributed process group (None at degree 1)

    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} = {n} is not divisible by model_parallel_size {self.size}")
        return n // self.size


SINGLE = TensorParallel()


def _even(n: int, size: int, what: str) -> int:
    if n % size:
        raise ValueError(f"{what} of size {n} does not split evenly over {size} ranks")
    return n // size


@dataclass(frozen=True)
class Layout:
    """How one parameter is laid out over tensor-parallel ranks.

    `replicated`: every rank holds the full tensor. `split`: each rank holds a contiguous
    1/size slice along `dim`; with `parts` (the full sizes of fused parts along `dim`, e.g. a
    fused q|k|v projection's (H*D, Hkv*D, Hkv*D)) each part is sliced separately and a rank
    holds its slice of every part, in part order. The layout does not depend on the degree.
    """

    kind: Literal["replicated", "split"]
    dim: int = 0
    parts: tuple[int, ...] = ()

    def split_parts(self, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fused parts of a full tensor (the whole tensor when it has none)."""
        if not self.parts:
            return (full,)
        if sum(self.parts) != full.shape[self.dim]:
            raise ValueError(
                f"parts {self.parts} do not add up to dim {self.dim} of shape {tuple(full.shape)}"
            )
        return full.split(list(self.parts), self.dim)

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """This rank's piece of the full tensor."""
        if self.kind == "replicated" or size == 1:
            return full
        pieces = []
        for part in self.split_parts(full):
            n = _even(part.shape[self.dim], size, f"dim {self.dim}")
            pieces.append(part.narrow(self.dim, rank * n, n))
        return torch.cat(pieces, self.dim).contiguous()

    def unshard(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's piece (in rank order)."""
        if self.kind == "replicated" or len(pieces) == 1:
            return pieces[0]
        if not self.parts:
            return torch.cat(list(pieces), self.dim)
        local = [_even(p, len(pieces), f"part of dim {self.dim}") for p in self.parts]
        per_rank = [p.split(local, self.dim) for p in pieces]  # per rank: its slice of each part
        return torch.cat(
            [torch.cat([r[i] for r in per_rank], self.dim) for i in range(len(local))], self.dim
        )


REPLICATED = Layout("replicated")

# "input": normal(0, init std); "output": normal(0, output-layer std) - the layers that write
# into the residual stream; "ones" / "zeros": constant.
InitRole = Literal["input", "output", "ones", "zeros"]


@dataclass(frozen=True)
class ParamSpec:
    layout: Layout
    init: InitRole


class DeclaresParams:
    """Mixin for modules owning parameters: `param_specs()` covers each of their own
    (non-recursive) parameters by local name ("weight", "bias"; absent ones may be listed)."""

    def param_specs(self) -> dict[str, ParamSpec]:
        raise NotImplementedError


def param_specs(model: nn.Module) -> dict[str, ParamSpec]:
    """Every parameter of `model` (as named by `named_parameters()`) -> its declared spec.
    Raises naming the parameters whose owning module declares no spec for them."""
    out: dict[str, ParamSpec] = {}
    undeclared: list[str] = []
    for prefix, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        specs = module.param_specs() if isinstance(module, DeclaresParams) else {}
        for local in own:
            name = f"{prefix}.{local}" if prefix else local
            if local in specs:
                out[name] = specs[local]
            else:
                undeclared.append(f"{name} ({type(module).__name__})")
    if undeclared:
        raise TypeError(
            "parameters whose module declares no layout / init role: " + ", ".join(undeclared)
        )
    return out


def param_layouts(model: nn.Module) -> dict[str, Layout]:
    return {n: s.layout for n, s in param_specs(model).items()}


def param_init_roles(model: nn.Module) -> dict[str, InitRole]:
    return {n: s.init for n, s in param_specs(model).items()}


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient (each rank saw part of the output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum of partial products); identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: object) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return x if tp.size == 1 else _CopyToTP.apply(x, tp.group)


def reduce_from_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp.group)


def _mark_sharded(module: nn.Module, tp: TensorParallel) -> None:
    # DeepSpeed's grad-norm counts params with this flag on every model-parallel rank and
    # replicated params on model-parallel rank 0 only: flag the ones the layer splits.
    if tp.size == 1:
        return
    for name, spec in module.param_specs().items():
        p = getattr(module, name)
        if p is not None and spec.layout.kind == "split":
            p.tensor_model_parallel = True


class ColumnParallelLinear(nn.Linear, DeclaresParams):
    """y_local = x W_local^T + b_local, this rank's output features: [.., in] -> [.., out/tp].

    `parts`: full sizes of fused outputs (e.g. q|k|v), each split over the ranks separately so
    a rank holds its slice of every part; by default the output is one part."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        bias: bool,
        tp: TensorParallel = SINGLE,
        parts: tuple[int, ...] = (),
    ) -> None:
        if parts and sum(parts) != d_out:
            raise ValueError(f"parts {parts} do not add up to {d_out} output features")
        local = sum(tp.split(p, "output features") for p in parts or (d_out,))
        super().__init__(d_in, local, bias=bias)
        self.tp = tp
        self.layout = Layout("split", 0, tuple(parts))
        _mark_sharded(self, tp)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec(self.layout, "input"), "bias": ParamSpec(self.layout, "zeros")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Linear, DeclaresParams):
    """y = all_reduce(x_local W_local^T) + b. [.., in/tp] -> [.., out]; the bias is replicated.

    Row-parallel layers are the ones writing into the residual stream (attention output,
    MLP down projection): their weight takes the output-layer init."""

    def __init__(self, d_in: int, d_out: int, bias: bool, tp: TensorParallel = SINGLE) -> None:
        super().__init__(tp.split(d_in, "input features"), d_out, bias=bias)
        self.tp = tp
        _mark_sharded(self, tp)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {
            "weight": ParamSpec(Layout("split", 1), "output"),
            "bias": ParamSpec(REPLICATED, "zeros"),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return out if self.bias is None else out + self.bias


class ReplicatedEmbedding(nn.Embedding, DeclaresParams):
    """A plain embedding held whole on every rank (e.g. learned position embeddings)."""

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec(REPLICATED, "input")}


class VocabParallelEmbedding(nn.Embedding, DeclaresParams):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the embedding; other ids contribute zeros."""

    def __init__(self, vocab: int, dim: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(tp.split(vocab, "padded vocabulary"), dim)
        self.tp = tp
        self.start = tp.rank * self.num_embeddings
        _mark_sharded(self, tp)

    def param_specs(self) -> dict[str, ParamSpec]:
        return {"weight": ParamSpec(Layout("split", 0), "input")}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, dim]
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.tp)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,  # [N, V/tp] (the full vocabulary at degree 1)
    labels: torch.Tensor,  # [N]
    tp: TensorParallel = SINGLE,
) -> torch.Tensor:  # per-token loss [N]
    return chunked_cross_entropy(logits, labels, tp.rank * logits.shape[-1], tp.group)
