"""Entry point run on every rank (`train.py`), with or without a launcher."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch.distributed as dist

from megatron.config.loader import build_config, merge_sources
from megatron.config.schema import Config
from megatron.config.sources import gather_sources, launch_sources
from megatron.data.bundled import prepare_bundled_data
from megatron.training.distributed import init_distributed
from megatron.training.host_memory import tune_host_allocator
from megatron.training.run import build_run

log = logging.getLogger("megatron")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a model (run by deepy.py or directly).")
    p.add_argument("configs", nargs="*", help="YAML config files, merged in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    carriers = p.add_mutually_exclusive_group()
    carriers.add_argument("--config-file", help="config sources written by deepy.py (JSON)")
    carriers.add_argument("--config-env", help="variable holding deepy.py's serialized config")
    carriers.add_argument("--config-b64", help="deepy.py's serialized config (--print-config)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    launched = args.config_file or args.config_env or args.config_b64
    if not args.configs and not launched:
        p.error("give at least one YAML config")
    if args.configs and launched:
        p.error("give YAML configs or deepy.py's --config-file / --config-env, not both")
    return args


def main(argv: list[str] | None = None) -> list[float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tune_host_allocator()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    launched = launch_sources(args.config_file, args.config_env, args.config_b64)
    sources, raw = launched or gather_sources(args.configs, args.set)
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
