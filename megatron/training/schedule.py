"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to min_lr."""

from __future__ import annotations

import math

from megatron.config.schema import OptimizerConfig, ScheduleConfig


def lr_at(step: int, opt: OptimizerConfig, sched: ScheduleConfig, train_iters: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the lr used by the step-th update)."""
    decay_iters = sched.lr_decay_iters or train_iters
    warmup = int(sched.warmup * decay_iters)
    if warmup and step < warmup:
        return opt.lr * (step + 1) / warmup
    if sched.lr_decay_style == "constant":
        return opt.lr
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    if sched.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return sched.min_lr + coeff * (opt.lr - sched.min_lr)
