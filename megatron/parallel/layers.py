"""Megatron-style tensor-parallel layers. At degree 1 each is exactly the plain layer.

`TensorParallel` describes this rank's tensor-parallel group; layers take it at construction
(no globals). Column-parallel layers split output features, row-parallel layers split input
features and all-reduce their output; the vocabulary is split for the embedding, the head and
the cross-entropy, so full logits are never gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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


def _mark_sharded(*params: nn.Parameter | None) -> None:
    # DeepSpeed's grad-norm counts params with this flag on every model-parallel rank and
    # replicated params on model-parallel rank 0 only.
    for p in params:
        if p is not None:
            p.tensor_model_parallel = True


class ColumnParallelLinear(nn.Linear):
    """y_local = x W_local^T + b_local, this rank's output features: [.., in] -> [.., out/tp]."""

    def __init__(self, d_in: int, d_out: int, bias: bool, tp: TensorParallel = SINGLE) -> None:
        super().__init__(d_in, tp.split(d_out, "output features"), bias=bias)
        self.tp = tp
        if tp.size > 1:
            _mark_sharded(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local W_local^T) + b. [.., in/tp] -> [.., out]; the bias is replicated."""

    def __init__(self, d_in: int, d_out: int, bias: bool, tp: TensorParallel = SINGLE) -> None:
        super().__init__(tp.split(d_in, "input features"), d_out, bias=bias)
        self.tp = tp
        if tp.size > 1:
            _mark_sharded(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        out = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the embedding; other ids contribute zeros."""

    def __init__(self, vocab: int, dim: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(tp.split(vocab, "padded vocabulary"), dim)
        self.tp = tp
        self.start = tp.rank * self.num_embeddings
        if tp.size > 1:
            _mark_sharded(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, dim]
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.tp)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, start: int, group: object):
        # logits [N, V/tp] float32, labels [N] global ids -> per-token loss [N]
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max[:, None]
        local = labels - start
        outside = (local < 0) | (local >= logits.shape[-1])
        idx = local.masked_fill(outside, 0)
        target = shifted.gather(1, idx[:, None]).squeeze(1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(target, group=group)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp / sum_exp[:, None], idx, outside)
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, idx, outside = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, idx] -= (~outside).to(g.dtype)
        return g * grad[:, None], None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,  # [N, V/tp] (the full vocabulary at degree 1)
    labels: torch.Tensor,  # [N]
    tp: TensorParallel = SINGLE,
) -> torch.Tensor:  # per-token loss [N]
    logits = logits.float()
    if tp.size == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    return _VocabParallelCE.apply(logits, labels, tp.rank * logits.shape[-1], tp.group)
