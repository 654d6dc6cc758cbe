"""Rank-0 logging: console line with rate and ETA, TensorBoard, and wandb (offline by default)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from megatron.config.schema import LoggingConfig

log = logging.getLogger("megatron")


class MetricsWriter:
    def __init__(self, cfg: LoggingConfig, rank: int, run_config: dict[str, Any], save: str | None):
        self.enabled = rank == 0
        self.tb = self.wandb = self.jsonl = None
        if not self.enabled:
            return
        if cfg.metrics_jsonl:
            self.jsonl = open(cfg.metrics_jsonl, "a")  # closed in close()
        if cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_dir)
        if cfg.use_wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            if cfg.wandb_mode != "online":
                # wandb's analytics follow its process-wide settings, not init's `mode`: without
                # this an offline run still resolves and contacts wandb's server.
                wandb.setup(settings=wandb.Settings(mode=cfg.wandb_mode))
            self.wandb = wandb.init(
                project=cfg.wandb_project,
                entity=cfg.wandb_team,
                group=cfg.wandb_group,
                mode=cfg.wandb_mode,
                dir=cfg.wandb_dir or save or ".",
                config=run_config,
            )

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"iteration": step, **values}) + "\n")
            self.jsonl.flush()
        values = {k: v for k, v in values.items() if v is not None}  # e.g. no grad norm
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_line(it: int, total: int, values: dict[str, float], eta_s: float) -> str:
    skipped = values.get("train/skipped_steps")
    return (
        f"iter {it:>6}/{total} | loss {_num(values.get('train/loss'), '.4f')} | "
        f"lr {values['train/lr']:.3e} | grad norm {_num(values.get('train/grad_norm'), '.3f')} | "
        f"tokens/s {values['train/tokens_per_s']:,.0f} | ms/iter {values['train/ms_per_iter']:.1f}"
        + (f" | skipped {int(skipped)}" if skipped else "")
        + f" | ETA {_hms(eta_s)}"
    )


def _num(value: float | None, spec: str) -> str:
    """A value may be missing (no grad norm without clipping under the pipeline engine) or
    non-finite (a skipped step): say so instead of failing to format."""
    return "n/a" if value is None else format(value, spec)


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
