"""Read any checkpoint our trainer writes into one full, single-device state dict.

Sources, in order of preference (every one is checked before anything is converted):
1. `universal/state.pt`: the full weights the trainer gathered at save time (ZeRO 0, fp32, any
   TP x PP layout; see megatron/training/universal.py).
2. ZeRO 1-3 partitions: consolidated by DeepSpeed's own `zero_to_fp32` (never reimplemented).
3. `mp_rank_XX_model_states.pt` (one per tensor-parallel rank, e.g. bf16 at ZeRO 0): the
   ranks' shards merged by the layouts our layers declare (`unshard_state`), so row-parallel
   biases are taken once, not summed (GPT-NeoX's issue #615).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.config.loader import load_config
from megatron.config.schema import Config
from megatron.model.transformer import GPTModel
from megatron.parallel.layers import param_layouts
from megatron.parallel.sharding import unshard_state
from megatron.training.checkpoint import COMPLETE

Tensor = torch.Tensor


class CheckpointRefused(ValueError):
    """The checkpoint cannot be converted exactly (the message says why)."""


@dataclass
class NeoxCheckpoint:
    step_dir: Path
    cfg: Config
    state: dict[str, Tensor]
    source: str  # which of the three sources the weights came from


def resolve_step_dir(input_dir: str | Path) -> Path:
    """A `global_stepN` directory, or a save directory whose `latest` names one; refuses an
    incomplete checkpoint (no COMPLETE marker)."""
    path = Path(input_dir)
    if (path / "latest").is_file() and not (path / "config.yml").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir():
        raise CheckpointRefused(f"{path} is not a checkpoint directory")
    if not (path / COMPLETE).is_file():
        raise CheckpointRefused(
            f"checkpoint {path} is incomplete (no {COMPLETE} marker): its save did not finish"
        )
    if not (path / "config.yml").is_file():
        raise CheckpointRefused(f"{path} has no config.yml (not written by our trainer)")
    return path


def _layouts(cfg: Config, vocab: int) -> dict:
    with torch.device("meta"):
        return param_layouts(GPTModel(cfg.model, cfg.sepllm, vocab))


def _from_universal(path: Path) -> dict[str, Tensor] | None:
    meta = path / "universal" / "meta.json"
    if not meta.is_file() or not json.loads(meta.read_text())["full_state"]:
        return None
    full = torch.load(path / "universal" / "state.pt", map_location="cpu", weights_only=False)
    return {name: entry["param"] for name, entry in full.items()}


def _from_zero(path: Path, cfg: Config) -> dict[str, Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if cfg.parallel.model_parallel_size > 1 or cfg.parallel.pipe_parallel_size > 1:
        raise CheckpointRefused(
            "ZeRO >= 1 with model_parallel_size / pipe_parallel_size > 1: DeepSpeed's "
            "zero_to_fp32 consolidates data-parallel partitions only"
        )
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k: v.detach().clone() for k, v in state.items()}


def _from_model_states(path: Path, cfg: Config) -> dict[str, Tensor]:
    tp = cfg.parallel.model_parallel_size
    if cfg.parallel.pipe_parallel_size > 1:
        raise CheckpointRefused(
            f"pipe_parallel_size {cfg.parallel.pipe_parallel_size} without a full universal "
            "copy (saved with bf16 or ZeRO >= 1): reload it at PP=1 with finetune and save again"
        )
    files = [path / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointRefused(f"{path} lacks {', '.join(missing)}")
    pieces = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    if tp == 1:
        return dict(pieces[0])
    vocab = pieces[0]["embedding.embed.weight"].shape[0] * tp
    return unshard_state(pieces, _layouts(cfg, vocab))


def read_checkpoint(
    input_dir: str | Path, check: Callable[[Config], None] | None = None
) -> NeoxCheckpoint:
    """The checkpoint's config and full weights; `check(cfg)` runs before any weight is read
    (refusing an unmappable architecture should not wait for a large load)."""
    path = resolve_step_dir(input_dir)
    cfg = load_config([path / "config.yml"])
    if check is not None:
        check(cfg)
    state, source = _from_universal(path), "universal"
    if state is None and cfg.training.zero_optimization.get("stage", 0) >= 1:
        state, source = _from_zero(path, cfg), "zero_to_fp32"
    if state is None:
        state, source = _from_model_states(path, cfg), "mp_rank model states"
    vocab = state["embedding.embed.weight"].shape[0]
    expected = set(_layouts(cfg, vocab))
    if set(state) != expected:
        raise CheckpointRefused(
            f"{path}: weights do not match the config's model (missing "
            f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})"
        )
    return NeoxCheckpoint(path, cfg, state, source)
