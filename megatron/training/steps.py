"""One optimizer step and one evaluation batch, for the plain engine and the pipeline engine.

Both hold a DeepSpeed engine and a scheduler; the trainer loop does not know which it has.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron.config.schema import Config
from megatron.parallel.layers import TensorParallel, param_layouts, vocab_parallel_cross_entropy
from megatron.parallel.sharding import shard_state
from megatron.parallel.topology import Parallelism
from megatron.training.batches import split_batch
from megatron.training.pipeline import TIED_PREFIX, build_pipeline, load_from_full
from megatron.training.setup import build_engine, build_model

Batches = Iterator[torch.Tensor]  # [B, S+1] token windows of this rank


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, tp: TensorParallel
) -> torch.Tensor:  # logits [B, S, V/tp], labels/mask [B, S]
    losses = vocab_parallel_cross_entropy(logits.flatten(0, 1), labels.flatten(), tp)
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1.0)


def mark_norm_owners(module: torch.nn.Module, par: Parallelism, skip_prefix: str = "") -> None:
    """Make DeepSpeed's grad-norm count every gradient exactly once.

    DeepSpeed sums squared grads over the model-parallel group (pipeline x tensor), counting a
    parameter when it is flagged `tensor_model_parallel` or when the rank is model-parallel
    rank 0. Tensor-parallel shards are flagged by their layers; here replicated parameters are
    flagged on tensor rank 0 of every stage, and copies of tied weights outside their first
    stage (names starting with `skip_prefix`) are unflagged.
    """
    for name, p in module.named_parameters():
        if skip_prefix and name.startswith(skip_prefix):
            p.tensor_model_parallel = False
        elif not getattr(p, "tensor_model_parallel", False) and par.tp.rank == 0:
            p.tensor_model_parallel = True


# The norm above which DeepSpeed's fp32 clipping (a sum of squares in fp32) overflows to inf:
# grad_norm sums in fp64 and stays finite there, so the skip decides on this bound instead.
FP32_NORM_LIMIT = math.sqrt(torch.finfo(torch.float32).max)


def grad_norm(module: torch.nn.Module, par: Parallelism) -> float:
    """The global grad norm by the same ownership rule DeepSpeed clips with."""
    owner0 = par.grid.get_model_parallel_rank() == 0
    sq = torch.zeros(1, dtype=torch.float64, device=next(module.parameters()).device)
    for p in module.parameters():
        if p.grad is not None and (owner0 or getattr(p, "tensor_model_parallel", False)):
            sq += p.grad.double().square().sum()
    if par.grid.get_model_parallel_world_size() > 1:
        dist.all_reduce(sq, group=par.grid.get_model_parallel_group())
    return float(sq.sqrt())


class NormRecorder:
    """DeepSpeed's fp32 path clips gradients but does not report the norm: wrap its clipping
    to record the norm it computed (no second pass over the gradients)."""

    def __init__(self, engine: Any) -> None:
        # `value` is None until clipping ran: a NaN norm is a real (diverged) value to report,
        # never a sentinel for "not computed".
        self.engine, self.value = engine, None
        if engine.gradient_clipping() > 0:
            engine.clip_fp32_gradients = self._clip_and_record

    def _clip_and_record(self) -> None:
        from deepspeed.runtime.utils import clip_grad_norm_  # deferred: heavy import

        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        max_norm = self.engine.gradient_clipping()
        mpu = self.engine.mpu
        if mpu is None or mpu.get_model_parallel_world_size() == 1:
            # No model parallelism: torch's multi-tensor clip computes the same norm in a few
            # fused calls instead of one Python-level norm per parameter.
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        else:
            norm = clip_grad_norm_(params, max_norm=max_norm, mpu=mpu)
        self.value = float(norm)

    def norm(self) -> float | None:
        """The engine's own norm (ZeRO / bf16 optimizers), else the recorded one."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            return float(norm)
        return self.value  # None: clipping is off and nothing computed it


class EngineSteps:
    """Data / tensor parallel (any ZeRO stage): micro steps through engine(inputs)."""

    def __init__(self, cfg: Config, par: Parallelism, eod: int | None) -> None:
        self.cfg, self.par, self.eod = cfg, par, eod
        model = build_model(cfg, par.tp)
        self.engine, self.scheduler = build_engine(cfg, model, par.grid)
        self.norms = NormRecorder(self.engine)
        self.clipping = self.engine.gradient_clipping() > 0
        self.skip_nonfinite = cfg.training.skip_nonfinite_steps
        # Whether the last train_step left the weights untouched (preflight allows the skip
        # only where gradients live in p.grad: fp32, ZeRO 0, no pipeline).
        self.skipped = False

    def _loss(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, labels, mask = split_batch(tokens, self.eod, self.cfg.data.eod_mask_loss)
        return lm_loss(self.engine(inputs), labels, mask, self.par.tp)

    def train_step(self, batches: Batches) -> tuple[float, float | None]:
        """One optimizer step: (mean micro-batch loss, global grad norm before clipping)."""
        total, norm = 0.0, None
        self.skipped = False
        for _ in range(self.cfg.derived.grad_accum):
            loss = self._loss(next(batches))
            self.engine.backward(loss)
            total += loss.detach().float().item()
            if self.engine.is_gradient_accumulation_boundary():
                if not self.clipping or self.skip_nonfinite:
                    norm = grad_norm(self.engine.module, self.par)  # nothing else computes it
                # Decided on the norm alone: gradients are already all-reduced, so every
                # data-parallel rank sees the same norm (its own loss could differ).
                if self.skip_nonfinite and not norm <= FP32_NORM_LIMIT:  # NaN / inf too
                    self._drop_gradients()
            self.engine.step()
        recorded = None if self.skipped else self.norms.norm()
        return total / self.cfg.derived.grad_accum, recorded if recorded is not None else norm

    def _drop_gradients(self) -> None:
        """Make the coming optimizer step a no-op: torch optimizers skip parameters without a
        gradient (no update, no weight decay, no Adam step count)."""
        for p in self.engine.module.parameters():
            p.grad = None
        self.skipped = True

    def eval_loss(self, batches: Batches) -> float:
        """Mean loss of one global batch's worth of micro-batches."""
        n = self.cfg.derived.grad_accum
        return sum(self._loss(next(batches)).float().item() for _ in range(n)) / n


class PipelineSteps:
    """Pipeline parallel: DeepSpeed's 1F1B schedule over one global batch per call."""

    def __init__(self, cfg: Config, par: Parallelism, eod: int | None) -> None:
        self.cfg, self.par, self.eod = cfg, par, eod
        full = build_model(cfg)  # same seed everywhere: every layout starts identical
        state = shard_state(full.state_dict(), param_layouts(full), par.tp.rank, par.tp.size)
        del full
        tp = par.tp
        pipe = build_pipeline(
            cfg, tp, par.grid.topology(), lambda out, lab: lm_loss(out, lab[0], lab[1], tp)
        )
        load_from_full(pipe, state, cfg)
        last = par.pp_rank == par.pp_size - 1
        mark_norm_owners(pipe, par, TIED_PREFIX if last and par.pp_size > 1 else "")
        # The pipeline module brings its own grid (built from the same topology) as mpu.
        self.engine, self.scheduler = build_engine(cfg, pipe, None)
        self.norms = NormRecorder(self.engine)

    def _micro(self, batches: Batches) -> Iterator[tuple[torch.Tensor, tuple]]:
        for tokens in batches:
            inputs, labels, mask = split_batch(tokens, self.eod, self.cfg.data.eod_mask_loss)
            yield inputs, (labels, mask)

    def train_step(self, batches: Batches) -> tuple[float, float | None]:
        loss = self.engine.train_batch(data_iter=self._micro(batches))
        return float(loss), self.norms.norm()  # None: no clipping, nothing computed the norm

    def eval_loss(self, batches: Batches) -> float:
        loss = self.engine.eval_batch(data_iter=self._micro(batches), return_logits=False)
        return float(loss)


def build_steps(cfg: Config, par: Parallelism, eod: int | None) -> Any:
    if par.pp_size > 1:
        return PipelineSteps(cfg, par, eod)
    return EngineSteps(cfg, par, eod)
