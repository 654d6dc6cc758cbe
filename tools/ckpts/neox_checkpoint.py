"""Read any checkpoint our trainer writes into one full, single-device state dict.

Sources, in order of preference (every one is checked before anything is converted):
1. `universal/state.pt`: the full weights the trainer gathered at save time (ZeRO 0, fp32, any
   TP x PP layout; see megatron/training/universal.py).
2. ZeRO partitions (`zero_pp_rank_D_mp_rank_TT_*`, ZeRO 1-3 through DeepSpeed's ZeRO
   optimizer, no pipeline): consolidated by DeepSpeed's own `zero_to_fp32`, once per
   tensor-parallel rank (it merges data-parallel partitions only, so each call sees one rank's
   files through a directory of links), giving the fp32 master weights.
3. Module weights, which ZeRO 0-2 never partition: the pipeline's per-layer files
   `layer_LL-model_TT-model_states.pt` (PP > 1: ZeRO 0-1, fp32 and bf16) or
   `mp_rank_TT_model_states.pt` (no pipeline: ZeRO 0, or bf16 with DeepSpeed's BF16 optimizer,
   whose `bf16_zero_*` files zero_to_fp32 does not read).
Tensor-parallel shards are merged by the layouts our layers declare (`unshard_state`), so
row-parallel biases are taken once, not summed (GPT-NeoX's issue #615).
"""

from __future__ import annotations

import json
import tempfile
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
from megatron.training.pipeline import piece_sources

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


def _merge_tp(shards: list[dict[str, Tensor]], cfg: Config) -> dict[str, Tensor]:
    """One full state dict from the tensor-parallel ranks' state dicts (rank order)."""
    if len(shards) == 1:
        return dict(shards[0])
    vocab = shards[0]["embedding.embed.weight"].shape[0] * len(shards)
    return unshard_state(shards, _layouts(cfg, vocab))


def _rank_files(path: Path, pattern: str, count: int) -> list[list[Path]]:
    """Per tensor-parallel rank, the files matching `pattern` (formatted with the rank);
    refuses a checkpoint where a rank has none."""
    per_rank = [sorted(path.glob(pattern.format(tp=r))) for r in range(count)]
    empty = [pattern.format(tp=r) for r, files in enumerate(per_rank) if not files]
    if empty:
        raise CheckpointRefused(f"{path} lacks {', '.join(empty)}")
    return per_rank


def zero_partition_files(path: Path) -> list[Path]:
    """DeepSpeed ZeRO-optimizer partitions (what zero_to_fp32 reads; not `bf16_zero_*`)."""
    return sorted(path.glob("zero_pp_rank_*_mp_rank_*_optim_states.pt"))


def _from_zero(path: Path, cfg: Config) -> dict[str, Tensor]:
    """fp32 master weights: DeepSpeed's zero_to_fp32 on each tensor-parallel rank's files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage3 = cfg.training.zero_optimization.get("stage", 0) == 3
    model_pattern = "zero_pp_rank_*_mp_rank_{tp:02d}_model_states.pt" if stage3 else (
        "mp_rank_{tp:02d}_model_states.pt"
    )  # fmt: skip
    tp = cfg.parallel.model_parallel_size
    optim = _rank_files(path, "zero_pp_rank_*_mp_rank_{tp:02d}_optim_states.pt", tp)
    models = _rank_files(path, model_pattern, tp)
    shards = []
    for files in (m + o for m, o in zip(models, optim, strict=True)):
        with tempfile.TemporaryDirectory(prefix="zero_to_fp32_") as tmp:
            tag = Path(tmp) / path.name
            tag.mkdir()
            for f in files:  # links: zero_to_fp32 globs a directory, this rank's files only
                (tag / f.name).symlink_to(f.resolve())
            state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=path.name)
            shards.append({k: v.detach().clone() for k, v in state.items()})
    return _merge_tp(shards, cfg)


def _load_weights(file: Path) -> dict[str, Tensor]:
    return torch.load(file, map_location="cpu", weights_only=False)


def _from_layer_files(path: Path, cfg: Config) -> dict[str, Tensor]:
    """A pipeline's module weights: one file per (piece, tensor-parallel rank), whose keys are
    the piece's own (a tied head has no file of its own)."""
    shards = []
    for tp in range(cfg.parallel.model_parallel_size):
        state: dict[str, Tensor] = {}
        for index, (source, wraps) in enumerate(piece_sources(cfg.model)):
            file = path / f"layer_{index:02d}-model_{tp:02d}-model_states.pt"
            if not file.is_file():
                raise CheckpointRefused(f"{path} lacks {file.name} (pipeline piece {index})")
            for key, value in _load_weights(file).items():
                if not key.startswith(wraps):
                    raise CheckpointRefused(f"{file.name}: unexpected key {key}")
                state[source + key[len(wraps) :]] = value
        shards.append(state)
    return _merge_tp(shards, cfg)


def _from_model_states(path: Path, cfg: Config) -> dict[str, Tensor]:
    tp = cfg.parallel.model_parallel_size
    files = [path / f"mp_rank_{r:02d}_model_states.pt" for r in range(tp)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointRefused(f"{path} lacks {', '.join(missing)}")
    return _merge_tp([_load_weights(f)["module"] for f in files], cfg)


def _read_weights(path: Path, cfg: Config) -> tuple[dict[str, Tensor], str]:
    """The full weights and the name of their source (see the module docstring)."""
    state = _from_universal(path)
    if state is not None:
        return state, "universal"
    stage = cfg.training.zero_optimization.get("stage", 0)
    if stage == 3 or (
        stage >= 1 and cfg.parallel.pipe_parallel_size <= 1 and zero_partition_files(path)
    ):
        return _from_zero(path, cfg), "zero_to_fp32"
    if cfg.parallel.pipe_parallel_size > 1:
        return _from_layer_files(path, cfg), "pipeline layer files"
    return _from_model_states(path, cfg), "mp_rank model states"


def read_checkpoint(
    input_dir: str | Path, check: Callable[[Config], None] | None = None
) -> NeoxCheckpoint:
    """The checkpoint's config and full weights; `check(cfg)` runs before any weight is read
    (refusing an unmappable architecture should not wait for a large load)."""
    path = resolve_step_dir(input_dir)
    cfg = load_config([path / "config.yml"])
    if check is not None:
        check(cfg)
    state, source = _read_weights(path, cfg)
    vocab = state["embedding.embed.weight"].shape[0]
    expected = set(_layouts(cfg, vocab))
    if set(state) != expected:
        raise CheckpointRefused(
            f"{path}: weights do not match the config's model (missing "
            f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})"
        )
    return NeoxCheckpoint(path, cfg, state, source)
