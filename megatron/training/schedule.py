"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to min_lr."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from megatron.config.schema import OptimizerConfig, ScheduleConfig


def warmup_steps(sched: ScheduleConfig, train_iters: int) -> int:
    """Warmup length in steps: warmup_iters, or the `warmup` fraction of the decay steps."""
    if sched.warmup_iters is not None:
        return sched.warmup_iters
    return int(sched.warmup * (sched.lr_decay_iters or train_iters))


def lr_at(step: int, opt: OptimizerConfig, sched: ScheduleConfig, train_iters: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the lr used by the step-th update)."""
    decay_iters = sched.lr_decay_iters or train_iters
    warmup = warmup_steps(sched, train_iters)
    if warmup and step < warmup:
        return opt.lr * (step + 1) / warmup
    if sched.lr_decay_style == "constant":
        return opt.lr
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    if sched.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = sched.min_lr if sched.decay_lr_to is None else sched.decay_lr_to * opt.lr
    return floor + coeff * (opt.lr - floor)


# Values NeoX's override_lr_scheduler takes from the config on resume (DeepSpeed restores the
# optimizer's param groups and the scheduler's base lr from the checkpoint otherwise).
OVERRIDDEN = (
    ("optimizer", "lr"),
    ("optimizer", "adam_beta1"),
    ("optimizer", "adam_beta2"),
    ("optimizer", "adam_eps"),
    ("optimizer", "weight_decay"),
    ("schedule", "lr_decay_style"),
    ("schedule", "lr_decay_iters"),
    ("schedule", "warmup"),
    ("schedule", "warmup_iters"),
    ("schedule", "min_lr"),
    ("schedule", "decay_lr_to"),
)


def apply_config_hyperparameters(
    scheduler: LambdaLR, opt: OptimizerConfig, sched: ScheduleConfig, train_iters: int
) -> float:
    """After a resume with override_lr_scheduler: this config's lr schedule, betas, eps and
    weight decay from the resumed step on; returns the lr of the next step. The first group
    decays, the second (biases, norms) keeps weight_decay 0 (optimizer.param_groups)."""
    scheduler.base_lrs = [opt.lr for _ in scheduler.base_lrs]
    lr = lr_at(scheduler.last_epoch, opt, sched, train_iters)
    for i, group in enumerate(scheduler.optimizer.param_groups):
        group["initial_lr"] = opt.lr
        group["lr"] = lr
        group["betas"] = (opt.adam_beta1, opt.adam_beta2)
        group["eps"] = opt.adam_eps
        group["weight_decay"] = opt.weight_decay if i == 0 else 0.0  # optimizer.param_groups
    scheduler._last_lr = [lr for _ in scheduler.base_lrs]
    return lr
