"""Writing the parts of a checkpoint that are ours (DeepSpeed writes its own files).

The trainer calls `write_config`, `write_universal` and `finish` around DeepSpeed's save;
convert_hf_to_neox calls `write_full_checkpoint`, which writes the same files a ZeRO-0 fp32
run would have for its layout-independent copy, so every reader takes it as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron.checkpoint import checksums, layout
from megatron.common.files import atomic_write_text

# A layout-independent copy written without a run: (0, 0) matches no real TP x PP, so the
# trainer always reshards from it (there are no DeepSpeed files to load).
ANY_LAYOUT = 0


def write_config(step_dir: Path, resolved: dict[str, Any], raw_configs: dict[str, str]) -> None:
    """config.yml (the resolved sections) and the raw YAMLs under configs/."""
    (step_dir / layout.CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))
    (step_dir / layout.RAW_CONFIGS).mkdir(exist_ok=True)
    for name, text in raw_configs.items():
        (step_dir / layout.RAW_CONFIGS / Path(name).name).write_text(text)


def write_universal(step_dir: Path, full: dict[str, dict] | None, meta: dict[str, Any]) -> None:
    """universal/state.pt ({name: {"param": tensor, optimizer moments ...}}) and meta.json."""
    out = layout.universal_dir(step_dir)
    out.mkdir(parents=True, exist_ok=True)
    if full is not None:
        torch.save(full, out / layout.UNIVERSAL_STATE)
    (out / layout.UNIVERSAL_META).write_text(json.dumps(meta))


def finish(root: Path, step_dir: Path, iteration: int) -> None:
    """COMPLETE (checksums of every file), then `latest` (atomic): a reader sees the previous
    checkpoint or this whole one."""
    checksums.write_complete(step_dir, layout.COMPLETE, iteration)
    atomic_write_text(root / layout.LATEST, step_dir.name)


def write_full_checkpoint(
    root: Path,
    step: Path,
    state: dict[str, torch.Tensor],
    resolved: dict[str, Any],
    raw_configs: dict[str, str],
    source: str,
) -> None:
    """A complete iteration-0 checkpoint of full single-device weights in `step` (under
    `root`, which gets `latest`); files the caller put in `step` are covered by COMPLETE."""
    step.mkdir(parents=True, exist_ok=True)
    write_config(step, resolved, raw_configs)
    meta = {
        "iteration": 0,
        "model_parallel_size": ANY_LAYOUT,
        "pipe_parallel_size": ANY_LAYOUT,
        "full_state": True,
        "why_not": None,
        "source": source,
    }
    write_universal(step, {k: {"param": v} for k, v in state.items()}, meta)
    finish(root, step, 0)
