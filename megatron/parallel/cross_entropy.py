"""Cross-entropy over (vocabulary-parallel) logits without [N, V] temporaries.

`F.cross_entropy` keeps the log-softmax [N, V] for its backward and allocates two more [N, V]
tensors there (the NLL gradient, then the log-softmax gradient); bf16 logits add an fp32 copy
first. At seq 8192 x vocab 8192 each is 268 MB (1.6 GB at GPT-2's vocabulary), fresh every
step. This Function keeps only the logits it is given (the output layer's result, alive until
the loss anyway) and per-row statistics, walks the rows in chunks whose fp32 temporaries stay
near `CHUNK_ELEMENTS`, and writes the one [N, V] gradient directly in the logits' dtype.

With tensor parallelism each rank holds V/tp columns (global ids [start, start + V/tp)); the
row max, the sum of exponentials and the target logit are all-reduced over the tensor group,
three collectives per call, as Megatron's vocabulary-parallel cross-entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

# fp32 elements of one chunk's temporary (16 MB): small enough for glibc's heap to reuse it
# across chunks and steps instead of mapping fresh pages (megatron/training/host_memory.py)
CHUNK_ELEMENTS = 1 << 22


def _chunks(like: torch.Tensor) -> tuple[torch.Tensor, list[slice]]:
    """For logits [N, V]: one fp32 scratch [rows, V] and the row slices it walks, rows per
    chunk chosen so the scratch holds about CHUNK_ELEMENTS."""
    n, v = like.shape
    rows = max(1, min(n, CHUNK_ELEMENTS // max(1, v)))
    scratch = torch.empty(rows, v, dtype=torch.float32, device=like.device)
    return scratch, [slice(r, min(n, r + rows)) for r in range(0, n, rows)]


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, start: int, group):
        # logits [N, Vl] (any float dtype), labels [N] global ids -> per-token loss [N] fp32
        n, vl = logits.shape
        if group is None:  # the whole vocabulary: an id outside it is an indexing error
            idx, outside = labels, None
        else:
            local = labels - start
            outside = (local < 0) | (local >= vl)
            idx = local.masked_fill(outside, 0)
        row_max = logits.amax(dim=-1).float()  # [N]
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.empty(n, dtype=torch.float32, device=logits.device)
        scratch, chunks = _chunks(logits)
        for rows in chunks:
            tmp = scratch[: rows.stop - rows.start]
            torch.sub(logits[rows], row_max[rows, None], out=tmp)
            torch.sum(tmp.exp_(), dim=-1, out=sum_exp[rows])
        target = logits.gather(1, idx[:, None]).squeeze(1).float()  # [N]
        if group is not None:
            target.masked_fill_(outside, 0.0)
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target, group=group)
        lse = row_max.add_(sum_exp.log_())  # [N]
        ctx.save_for_backward(logits, idx, lse, outside)
        return lse - target

    @staticmethod
    @once_differentiable  # the gradient is computed in place in scratch buffers
    def backward(ctx, grad):  # grad [N] -> d logits [N, Vl]: (softmax - onehot) * grad
        logits, idx, lse, outside = ctx.saved_tensors
        grad = grad.float()
        hit = -grad if outside is None else (-grad).masked_fill_(outside, 0.0)  # [N]
        d_logits = torch.empty_like(logits)
        scratch, chunks = _chunks(logits)
        for rows in chunks:
            tmp = scratch[: rows.stop - rows.start]
            torch.sub(logits[rows], lse[rows, None], out=tmp)
            tmp.exp_().mul_(grad[rows, None])
            tmp.scatter_add_(1, idx[rows, None], hit[rows, None])  # the one-hot term, in fp32
            d_logits[rows].copy_(tmp)
        return d_logits, None, None, None


def chunked_cross_entropy(
    logits: torch.Tensor,  # [N, V] local columns (the full vocabulary without tensor parallel)
    labels: torch.Tensor,  # [N] global token ids
    start: int = 0,  # global id of this rank's first column
    group: object | None = None,  # tensor-parallel process group; None: the whole vocabulary
) -> torch.Tensor:  # per-token loss [N], float32
    """-log softmax(logits)[label] per row, computed in fp32 whatever the logits' dtype."""
    return _ChunkedCrossEntropy.apply(logits, labels, start, group)
