"""Entry point run on every rank (`train.py`), with or without a launcher."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

import torch
import torch.distributed as dist

from megatron.common.accelerator import pin_cpu_accelerator
from megatron.common.files import atomic_write_text
from megatron.common.watchdog import watch_launcher
from megatron.config.loader import ConfigError, build_config, merge_sources
from megatron.config.schema import Config
from megatron.config.sources import gather_sources, launch_sources
from megatron.data.bundled import prepare_bundled_data
from megatron.training.distributed import init_distributed
from megatron.training.host_memory import tune_host_allocator
from megatron.training.preflight import save_dir_lock
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
    pin_cpu_accelerator(os.environ)  # before DeepSpeed is imported here or in a child
    previous = STOP.install()
    watch_launcher(os.environ.get(LAUNCHER_ENV))
    try:
        return _main(argv)
    except ConfigError as exc:
        # A bad value is the user's to fix: the message, not a traceback (rc 2 like deepy.py).
        _report_error(exc)
        print(f"train.py: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Stopped as stop:
        # Exit non-zero so `timeout`, schedulers and the launcher see an interrupted run.
        log.error("rank stopped by %s; `latest` names the last complete checkpoint", stop)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise SystemExit(128 + stop.signum) from None
    except Exception as exc:
        _report_error(exc)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


ERRORS_ENV = "PYTHON_SEPNEOX_ERRORS"  # set by deepy.py: where ranks report a fatal error
LAUNCHER_ENV = "PYTHON_SEPNEOX_LAUNCHER"  # set by deepy.py: "<host> <pid>" of deepy.py itself


def _report_error(exc: Exception) -> None:
    """Leave this rank's error where deepy.py reads it after the launch, so the real error is
    the launch's last line (not the launcher's `exits with return code` lines after it)."""
    directory = os.environ.get(ERRORS_ENV)
    if not directory or not os.path.isdir(directory):
        return
    rank = os.environ.get("RANK", "0")
    with contextlib.suppress(OSError):
        atomic_write_text(
            os.path.join(directory, f"rank{rank}.txt"), f"{type(exc).__name__}: {exc}"
        )


def _main(argv: list[str] | None) -> list[float]:
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
    # One trainer per save directory, held from before the pre-flight to the last save.
    with save_dir_lock(cfg, rank):
        trainer = build_run(cfg, rank, world, device, raw).trainer
        _stop_between_steps(trainer, device)
        try:
            return trainer.run()
        finally:
            STOP.deferred = False  # after the loop a signal stops at once again


class Stopped(BaseException):  # like KeyboardInterrupt: `except Exception` must not eat it
    """A stop signal (SIGTERM, SIGINT) reached the ranks; they stopped between steps."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """SIGTERM / SIGINT handling on a rank.

    Before training (and on a second signal) the handler stops at once. While the loop runs it
    only records the signal: the ranks agree at the next step boundary (one all-reduce of a
    flag per step, so all stop at the same iteration even if only one was signalled), save a
    checkpoint of the last finished step (`checkpoint.save_on_stop`) and leave between steps,
    never inside a step or a periodic save: `latest` names the last complete checkpoint. The
    process then exits with 128 + the signal number.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferred = False

    def install(self) -> dict[int, Any]:
        """Install the handler; returns the previous handlers (main() restores them)."""
        self.received, self.deferred = None, False
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread
        return {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = signum
        if not (self.deferred and first):
            raise Stopped(signum)
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)


STOP = _StopSignals()


def _stop_between_steps(trainer: Any, device: Any) -> None:
    steps, step = trainer.steps, trainer.steps.train_step

    def guarded(batches: Any) -> Any:
        flag = torch.tensor([0 if STOP.received is None else STOP.received], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()):
            trainer.save_at_stop()
            raise Stopped(int(flag.item()))
        return step(batches)

    steps.train_step = guarded
    STOP.deferred = True
