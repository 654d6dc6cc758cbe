"""Checkpoints through DeepSpeed, with an atomic `latest`, RNG/data state, and retention.

Layout: <save>/global_step<N>/ (DeepSpeed files + rng_rank<r>.pt + config.yml + configs/ +
COMPLETE) and <save>/latest (the tag). `latest` is replaced by rename only after every rank has
finished writing, so a crash mid-save leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron.common.files import atomic_write_text
from megatron.config.schema import CheckpointConfig

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    pass


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine: Any,
    ckpt: CheckpointConfig,
    iteration: int,
    client_state: dict[str, Any],
    resolved_config: dict[str, Any],
    raw_configs: dict[str, str],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save on every rank; `extra(dir)` (called on every rank) adds files before COMPLETE."""
    root = Path(ckpt.save)
    tag = tag_for(iteration)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    out = root / tag
    torch.save(_rng_state(), out / f"rng_rank{rank}.pt")
    if extra is not None:
        extra(out)
    if rank == 0:
        (out / "config.yml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        (out / "configs").mkdir(exist_ok=True)
        for name, text in raw_configs.items():
            (out / "configs" / Path(name).name).write_text(text)
    dist.barrier()
    if rank == 0:
        (out / COMPLETE).write_text(str(iteration))
        atomic_write_text(root / "latest", tag)
        _prune(root, ckpt.keep_last_n_checkpoints, keep=tag)
    dist.barrier()
    return out


def _prune(root: Path, keep_last: int | None, keep: str) -> None:
    if not keep_last:
        return
    tags = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and p.is_dir()
    )
    for _, path in tags[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def find_tag(ckpt: CheckpointConfig) -> str | None:
    """The tag to load, None if `load` holds no checkpoint; raises on a broken one."""
    root = Path(ckpt.load)
    if ckpt.iteration is not None:
        tag = tag_for(ckpt.iteration)
        if not (root / tag).is_dir():
            raise CheckpointError(
                f"iteration {ckpt.iteration} requested but {root / tag} is missing"
            )
    else:
        latest = root / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
    if not (root / tag / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {root / tag} is incomplete (no {COMPLETE} marker)")
    return tag


def resolve_tag(ckpt: CheckpointConfig) -> str | None:
    """The tag to load; None (fresh start) only when allowed; raises otherwise."""
    tag = find_tag(ckpt)
    if tag is None and not ckpt.allow_fresh_start:
        raise CheckpointError(
            f"load = {ckpt.load} holds no checkpoint (no 'latest' file); refusing to start from "
            "iteration 0 silently. Fix the path or set allow_fresh_start: true."
        )
    return tag


def load(engine: Any, ckpt: CheckpointConfig, tag: str) -> int:
    """Load a checkpoint of the same layout; returns the iteration to continue from."""
    finetune = ckpt.finetune
    path, client = engine.load_checkpoint(
        ckpt.load,
        tag=tag,
        load_module_only=finetune,
        load_optimizer_states=not finetune,
        load_lr_scheduler_states=not finetune,
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(ckpt.load) / tag}")
    if finetune:
        return 0
    rng = Path(ckpt.load) / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return int(client["iteration"])
