"""Any checkpoint layout our trainer writes -> one full, single-device state dict.

Sources, in order of preference:
1. `universal/state.pt`: the full weights the trainer gathered at save time (ZeRO 0, fp32, any
   TP x PP layout; see megatron/training/universal.py), and what convert_hf_to_neox writes.
2. ZeRO partitions (`zero_pp_rank_D_mp_rank_TT_*`, ZeRO 1-3 through DeepSpeed's ZeRO
   optimizer, no pipeline): consolidated by DeepSpeed's own `zero_to_fp32`, once per
   tensor-parallel rank (it merges data-parallel partitions only, so each call sees one rank's
   files through a directory of links), giving the fp32 master weights. zero_to_fp32 unpickles
   with weights_only=False, so every file it reads is first read by our weights-only loader:
   a file holding anything but tensors and the allowlisted types is refused before it runs.
3. Module weights, which ZeRO 0-2 never partition: the pipeline's per-layer files (PP > 1:
   ZeRO 0-1, fp32 and bf16) or `mp_rank_TT_model_states.pt` (no pipeline: ZeRO 0, or bf16
   with DeepSpeed's BF16 optimizer, whose `bf16_zero_*` files zero_to_fp32 does not read).
Tensor-parallel shards are merged by the layouts our layers declare (`unshard_state`), so
row-parallel biases are taken once, not summed (GPT-NeoX's issue #615).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from megatron.checkpoint import layout
from megatron.checkpoint.safe_load import load_file
from megatron.config.schema import Config
from megatron.model.transformer import GPTModel
from megatron.parallel.layers import Layout, param_layouts
from megatron.parallel.sharding import unshard_state

Tensor = torch.Tensor


class CheckpointRefused(ValueError):
    """The checkpoint cannot be read exactly (the message names the file and why)."""


def model_layouts(cfg: Config, vocab: int) -> dict[str, Layout]:
    """Every parameter of the config's single-device model -> its layer's layout (on meta)."""
    with torch.device("meta"):
        return param_layouts(GPTModel(cfg.model, cfg.sepllm, vocab))


def _from_universal(path: Path, unsafe: bool) -> dict[str, Tensor] | None:
    meta = layout.read_universal_meta(path)
    if meta is None or not meta.get("full_state"):
        return None
    file = layout.universal_dir(path) / layout.UNIVERSAL_STATE
    full = load_file(file, allow_unsafe=unsafe, map_location="cpu")
    return {name: entry["param"] for name, entry in full.items()}


def _merge_tp(shards: list[dict[str, Tensor]], cfg: Config) -> dict[str, Tensor]:
    """One full state dict from the tensor-parallel ranks' state dicts (rank order)."""
    if len(shards) == 1:
        return dict(shards[0])
    vocab = shards[0]["embedding.embed.weight"].shape[0] * len(shards)
    return unshard_state(shards, model_layouts(cfg, vocab))


def _rank_files(path: Path, patterns: list[str]) -> list[list[Path]]:
    """Per tensor-parallel rank, the files matching its pattern; refuses a rank with none."""
    per_rank = [sorted(path.glob(p)) for p in patterns]
    empty = [p for p, files in zip(patterns, per_rank, strict=True) if not files]
    if empty:
        raise CheckpointRefused(f"{path} lacks {', '.join(empty)}")
    return per_rank


def zero_partition_files(path: Path) -> list[Path]:
    return sorted(path.glob(layout.zero_optim_pattern()))


def _from_zero(path: Path, cfg: Config, unsafe: bool) -> dict[str, Tensor]:
    """fp32 master weights: DeepSpeed's zero_to_fp32 on each tensor-parallel rank's files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage3 = cfg.training.zero_optimization.get("stage", 0) == 3
    ranks = range(cfg.parallel.model_parallel_size)
    model = [
        layout.zero3_model_pattern(r) if stage3 else layout.model_states_file(r) for r in ranks
    ]
    optim = _rank_files(path, [layout.zero_optim_pattern(r) for r in ranks])
    shards = []
    for files in (m + o for m, o in zip(_rank_files(path, model), optim, strict=True)):
        for f in files:  # the weights-only gate (see the module docstring)
            load_file(f, allow_unsafe=unsafe, map_location="cpu")
        with tempfile.TemporaryDirectory(prefix="zero_to_fp32_") as tmp:
            tag = Path(tmp) / path.name
            tag.mkdir()
            for f in files:  # links: zero_to_fp32 globs a directory, this rank's files only
                (tag / f.name).symlink_to(f.resolve())
            state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=path.name)
            shards.append({k: v.detach().clone() for k, v in state.items()})
    return _merge_tp(shards, cfg)


def _from_layer_files(path: Path, cfg: Config, unsafe: bool) -> dict[str, Tensor]:
    """A pipeline's module weights: one file per (piece, tensor-parallel rank), whose keys are
    the piece's own (a tied head has no file of its own)."""
    shards = []
    for tp in range(cfg.parallel.model_parallel_size):
        state: dict[str, Tensor] = {}
        for index, (source, wraps) in enumerate(layout.piece_sources(cfg.model)):
            file = path / layout.layer_file(index, tp)
            if not file.is_file():
                raise CheckpointRefused(f"{path} lacks {file.name} (pipeline piece {index})")
            for key, value in load_file(file, allow_unsafe=unsafe, map_location="cpu").items():
                if not key.startswith(wraps):
                    raise CheckpointRefused(f"{file}: unexpected key {key}")
                state[source + key[len(wraps) :]] = value
        shards.append(state)
    return _merge_tp(shards, cfg)


def _from_model_states(path: Path, cfg: Config, unsafe: bool) -> dict[str, Tensor]:
    files = [path / layout.model_states_file(r) for r in range(cfg.parallel.model_parallel_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointRefused(f"{path} lacks {', '.join(missing)}")
    states = [load_file(f, allow_unsafe=unsafe, map_location="cpu") for f in files]
    bad = [f.name for f, s in zip(files, states, strict=True) if "module" not in s]
    if bad:
        raise CheckpointRefused(f"{path}: {', '.join(bad)} hold no 'module' weights")
    return _merge_tp([s["module"] for s in states], cfg)


def read_weights(path: Path, cfg: Config, unsafe: bool = False) -> tuple[dict[str, Tensor], str]:
    """The full weights of `global_stepN` directory `path` and the name of their source;
    refuses weights that do not match the config's model."""
    state = _from_universal(path, unsafe)
    source = "universal"
    if state is None:
        stage = cfg.training.zero_optimization.get("stage", 0)
        pipelined = cfg.parallel.pipe_parallel_size > 1
        if stage == 3 or (stage >= 1 and not pipelined and zero_partition_files(path)):
            state, source = _from_zero(path, cfg, unsafe), "zero_to_fp32"
        elif pipelined:
            state, source = _from_layer_files(path, cfg, unsafe), "pipeline layer files"
        else:
            state, source = _from_model_states(path, cfg, unsafe), "mp_rank model states"
    if "embedding.embed.weight" not in state:
        raise CheckpointRefused(f"{path}: the weights ({source}) hold no embedding.embed.weight")
    expected = model_layouts(cfg, state["embedding.embed.weight"].shape[0])
    if set(state) != set(expected):
        raise CheckpointRefused(
            f"{path}: weights ({source}) do not match the config's model (missing "
            f"{sorted(set(expected) - set(state))[:5]}, unexpected "
            f"{sorted(set(state) - set(expected))[:5]})"
        )
    return state, source
