"""One way to assemble a run from a config: tokenizer, run shape, datasets, parallelism and the
trainer. `train.py` (megatron/training/main.py), the benchmarks and the eval tools call it, so
they cannot drift apart."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron.config.loader import ConfigError
from megatron.config.schema import Config
from megatron.config.validate import finalize
from megatron.data.builder import build_train_valid_test_datasets
from megatron.data.tokenizers import Tokenizer, build_tokenizer
from megatron.parallel.topology import Parallelism, build_parallelism
from megatron.training.preflight import run_preflight
from megatron.training.setup import Datasets, sample_counts
from megatron.training.trainer import Trainer

log = logging.getLogger("megatron")


@dataclass
class Run:
    cfg: Config  # finalized: cfg.derived holds the run's shape
    tokenizer: Tokenizer
    datasets: Datasets
    parallelism: Parallelism
    trainer: Trainer


def build_run(
    cfg: Config,
    rank: int,
    world: int,
    device: torch.device,
    raw_configs: dict[str, str] | None = None,
) -> Run:
    """Everything a rank needs to train `cfg` (the process group must exist already)."""
    if cfg.training.precision == "fp16" and device.type != "cuda":
        # Before any work, one line (NeoX's `fp16:` block sets precision fp16).
        raise ConfigError(
            f"precision fp16 needs a GPU (this rank runs on {device.type}): add --set "
            "precision=fp32 (or bfloat16)"
        )
    tokenizer = build_tokenizer(cfg.data)
    finalize(cfg, world, tokenizer.vocab_size)
    if rank == 0:
        _log_shape(cfg)
    # Directories, free space, a fresh run into used checkpoints, the resumed checkpoint's
    # config: refused now rather than after hours of training.
    run_preflight(cfg, rank)
    # Rank 0 builds (and caches) the index arrays first; the others then only load them.
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            train, valid, test = build_train_valid_test_datasets(
                cfg.data,
                cfg.model.seq_length,
                cfg.training.seed,
                sample_counts(cfg),
                vocab_size=tokenizer.vocab_size,  # rejects token ids the model cannot embed
            )
        dist.barrier()
    datasets = Datasets(train, valid, test)
    par = build_parallelism(cfg.parallel, world)
    trainer = Trainer(cfg, datasets, rank, device, tokenizer.eod, raw_configs or {}, par)
    return Run(cfg, tokenizer, datasets, par, trainer)


def _log_shape(cfg: Config) -> None:
    d: Any = cfg.derived
    log.info(
        "world %d | global batch %d = micro %d x accum %d x dp %d | vocab %d (padded %d)",
        d.world_size,
        d.global_batch,
        d.micro_batch,
        d.grad_accum,
        d.data_parallel_size,
        d.vocab_size,
        d.padded_vocab_size,
    )
