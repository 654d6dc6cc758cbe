"""Entry point run on every rank (`train.py`), with or without a launcher."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch.distributed as dist

from megatron.config.loader import build_config, merge_sources
from megatron.config.schema import Config
from megatron.config.sources import decode_sources, gather_sources
from megatron.data.bundled import prepare_bundled_data
from megatron.training.distributed import init_distributed
from megatron.training.host_memory import tune_host_allocator
from megatron.training.run import build_run

log = logging.getLogger("megatron")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a model (run by deepy.py or directly).")
    p.add_argument("configs", nargs="*", help="YAML config files, merged in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--config-b64", help="serialized config from deepy.py")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.configs and not args.config_b64:
        p.error("give at least one YAML config")
    return args


def main(argv: list[str] | None = None) -> list[float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tune_host_allocator()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.config_b64:
        sources, raw = decode_sources(args.config_b64)
    else:
        sources, raw = gather_sources(args.configs, args.set)
    cfg = build_config(merge_sources(sources))
    rank, world, device = init_distributed(cfg.launcher)
    if rank == 0:
        prepare_bundled_data(cfg)
    dist.barrier()
    if rank != 0:
        prepare_bundled_data(cfg)  # now only reads what rank 0 built
    losses = run(cfg, raw, rank, world, device)
    # Every rank finishes its sends and receives, then the groups are torn down before the
    # interpreter exits: gloo threads still alive during finalisation abort the process
    # (seen as SIGABRT under mpirun and "terminate called" after pipeline runs). On an error
    # the exception propagates instead and the launcher stops the other ranks.
    dist.barrier()
    dist.destroy_process_group()
    return losses


def run(cfg: Config, raw: dict[str, str], rank: int, world: int, device: Any) -> list[float]:
    return build_run(cfg, rank, world, device, raw).trainer.run()
