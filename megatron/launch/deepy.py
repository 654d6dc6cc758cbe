"""deepy.py: validate the config once, prepare bundled data, then start the DeepSpeed runner.

Every rank receives the same serialized config sources (not paths), so nodes need not share
the YAML files.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from megatron.config.loader import ConfigError, build_config, merge_sources
from megatron.config.schema import Config, LauncherConfig
from megatron.config.validate import validate
from megatron.training.main import encode_sources, gather_sources, prepare_bundled_data

log = logging.getLogger("megatron")


def procs_per_node(lc: LauncherConfig) -> int:
    if lc.num_gpus is not None:
        return lc.num_gpus
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def runner_args(lc: LauncherConfig, script: str, script_args: list[str]) -> list[str]:
    """Arguments of deepspeed.launcher.runner for this launcher section."""
    args: list[str] = []
    if lc.hostfile:
        args += ["--hostfile", lc.hostfile, "--launcher", lc.launcher]
        if lc.include:
            args += ["--include", lc.include]
        if lc.exclude:
            args += ["--exclude", lc.exclude]
        if not (lc.include or lc.exclude):
            args += ["--num_nodes", str(lc.num_nodes)]
            if lc.num_gpus is not None:
                args += ["--num_gpus", str(lc.num_gpus)]
    else:
        # No hostfile: one node, so the process count must be explicit (a CPU host has no GPUs
        # for the runner to count).
        args += ["--num_gpus", str(procs_per_node(lc))]
    if lc.master_addr:
        args += ["--master_addr", lc.master_addr]
    args += ["--master_port", str(lc.master_port)]
    if lc.force_multi:
        args.append("--force_multi")
    if lc.no_ssh_check:
        args.append("--no_ssh_check")
    return args + [script, *script_args]


def world_size_estimate(lc: LauncherConfig) -> int | None:
    """Total ranks when knowable before launch (single node, or num_nodes x num_gpus)."""
    if not lc.hostfile:
        return procs_per_node(lc)
    if lc.num_nodes > 0 and lc.num_gpus and not (lc.include or lc.exclude):
        return lc.num_nodes * lc.num_gpus
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="deepy.py", description="Launch training: deepy.py train.py a.yml [b.yml ...]"
    )
    p.add_argument("script", help="the per-rank script, normally train.py")
    p.add_argument("configs", nargs="+", help="YAML config files, merged in order")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set train_iters=10",
    )
    p.add_argument(
        "--num-gpus",
        "--num_gpus",
        type=int,
        default=None,
        help="processes per node (same as --set num_gpus=N)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the launcher command only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = args.set + ([f"num_gpus={args.num_gpus}"] if args.num_gpus else [])
        sources, raw = gather_sources(args.configs, overrides)
        cfg: Config = build_config(merge_sources(sources))
        world = world_size_estimate(cfg.launcher)
        validate(cfg, world or 1)
    except ConfigError as exc:
        print(f"deepy.py: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        prepare_bundled_data(cfg)  # once, before any rank starts
    cmd = runner_args(cfg.launcher, args.script, ["--config-b64", encode_sources(sources, raw)])
    log.info("deepspeed %s", " ".join(cmd[:-1]) + " <config>")
    if args.dry_run:
        return 0
    from deepspeed.launcher.runner import main as ds_main  # noqa: PLC0415

    ds_main(cmd)
    return 0
