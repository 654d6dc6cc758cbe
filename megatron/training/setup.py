"""Build everything a run needs from the config: data, model, optimizer, DeepSpeed engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from megatron.config.schema import Config
from megatron.model.transformer import GPTModel
from megatron.parallel.layers import SINGLE, TensorParallel, param_layouts
from megatron.parallel.sharding import shard_state
from megatron.training.optimizer import build_optimizer
from megatron.training.schedule import lr_at

log = logging.getLogger("megatron")


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    t, d = cfg.training, cfg.derived
    ds: dict[str, Any] = {
        "train_batch_size": d.global_batch,
        "train_micro_batch_size_per_gpu": d.micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "gradient_clipping": cfg.optimizer.gradient_clipping,
        "zero_optimization": dict(t.zero_optimization),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we print our own log line
        "wall_clock_breakdown": False,
    }
    if t.precision == "bfloat16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, **t.fp16_settings}
    ds.update(t.deepspeed_extra)
    return ds


def build_model(cfg: Config, tp: TensorParallel = SINGLE) -> GPTModel:
    """The model on this rank. Under tensor parallelism every rank first builds the full model
    from the same seed and keeps its shard, so any layout starts from identical weights."""
    args = (cfg.model, cfg.sepllm, cfg.derived.padded_vocab_size, cfg.derived.windows)
    torch.manual_seed(cfg.training.seed)
    full = GPTModel(*args, cfg.training.checkpoint_activations)
    if tp.size == 1:
        return full
    model = GPTModel(*args, cfg.training.checkpoint_activations, tp)
    model.load_state_dict(shard_state(full.state_dict(), param_layouts(full), tp.rank, tp.size))
    return model


def _warn_bf16_accumulation(engine: Any, grad_accum: int) -> None:
    """bf16 at ZeRO stage 0 without a pipeline gets DeepSpeed's fp16 optimizer wrappers (fused
    or not), which sum the micro-batch gradients in bf16. DeepSpeed accumulates in fp32 only
    through its BF16 optimizer (the pipeline engine; ZeRO stage 1 with
    data_types.grad_accum_dtype fp32) and refuses fp32 accumulation at stage 0, so this is
    said once, before training."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrappers = (FP16_Optimizer, FP16_UnfusedOptimizer)
    bf16_sums = engine.bfloat16_enabled() and isinstance(engine.optimizer, wrappers)
    if grad_accum > 1 and bf16_sums:
        log.warning(
            "precision bfloat16 with zero_optimization.stage 0: DeepSpeed sums the %d "
            "micro-batch gradients of each step in bf16; for fp32 accumulation use "
            "zero_optimization.stage 1 with deepspeed_extra: {data_types: {grad_accum_dtype: "
            "fp32}}",
            grad_accum,
        )


@dataclass
class Datasets:
    train: Dataset
    valid: Dataset | None
    test: Dataset | None


def sample_counts(cfg: Config) -> tuple[int, int, int]:
    """Samples each split must provide for the whole run (Megatron-style). The trainer never
    evaluates on the test split (its documents are only held out), so none are built."""
    g, lg = cfg.derived.global_batch, cfg.logging
    train = cfg.training.train_iters * g
    evals = (cfg.training.train_iters // lg.eval_interval + 1) if lg.eval_interval else 1
    valid = evals * lg.eval_iters * g
    return train, valid, 0


def build_engine(cfg: Config, model: GPTModel, mpu: Any = None) -> tuple[Any, Any]:
    import deepspeed  # heavy: imported when an engine is built

    if cfg.training.precision == "fp16" and not torch.cuda.is_available():
        raise RuntimeError("precision fp16 needs a GPU; use bfloat16 or fp32 on CPU")
    optimizer = build_optimizer(model, cfg.optimizer)
    sched_fn = lambda step: lr_at(step, cfg.optimizer, cfg.schedule, cfg.training.train_iters)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: sched_fn(step) / cfg.optimizer.lr
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
        mpu=mpu,
    )
    _warn_bf16_accumulation(engine, cfg.derived.grad_accum)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # A single data-parallel replica has nothing to average: skip DeepSpeed's flatten +
        # all-reduce of every gradient after backward.
        engine.enable_backward_allreduce = False
    return engine, scheduler
