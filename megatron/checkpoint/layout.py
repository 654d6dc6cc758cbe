"""The on-disk names of a checkpoint our trainer writes (the one place that spells them).

    <save>/latest                                   the tag, replaced by an atomic rename
    <save>/global_step<N>/config.yml                the resolved config (all sections)
                        /configs/                   the raw YAMLs the run was started with
                        /trainer_state.json         iteration, consumed samples, evaluations
                        /rng_rank<r>.pt             RNG state per rank
                        /mp_rank_TT_model_states.pt module weights (no pipeline), per TP rank
                        /layer_LL-model_TT-model_states.pt   a pipeline piece's weights
                        /zero_pp_rank_D_mp_rank_TT_{optim,model}_states.pt   ZeRO partitions
                        /bf16_zero_pp_rank_D_mp_rank_TT_optim_states.pt      bf16 optimizer
                        /universal/{state.pt,meta.json}      layout-independent full copy
                        /COMPLETE                   JSON manifest: iteration + SHA-256 per file

Pipeline naming: layer index LL of a piece is its position in the pipeline (embedding,
blocks, final norm, then the tied head, which has no file of its own); inside a piece the
GPTModel parameters sit under the piece's `WRAPS` prefix (`piece_sources`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from megatron.config.schema import ModelConfig

COMPLETE = "COMPLETE"
CONFIG = "config.yml"
RAW_CONFIGS = "configs"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
UNIVERSAL = "universal"
UNIVERSAL_STATE = "state.pt"
UNIVERSAL_META = "meta.json"
TAG = re.compile(r"^global_step(\d+)$")

# Where a pipeline piece keeps GPTModel's parameters (training/pipeline.py's pieces use these).
EMBEDDING_WRAPS = ""  # the piece is GPTModel's `embedding` itself
BLOCK_WRAPS = "block."  # GPTModel's `blocks.<i>` sits at `piece.block`
OUTPUT_WRAPS = "output."  # GPTModel's `output` sits at `piece.output`


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def model_states_file(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def layer_file(index: int, tp_rank: int) -> str:
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def zero_optim_pattern(tp_rank: int | None = None) -> str:
    """ZeRO-optimizer partitions (what DeepSpeed's zero_to_fp32 reads; not `bf16_zero_*`)."""
    tp = "*" if tp_rank is None else f"{tp_rank:02d}"
    return f"zero_pp_rank_*_mp_rank_{tp}_optim_states.pt"


def zero3_model_pattern(tp_rank: int) -> str:
    return f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_model_states.pt"


def piece_sources(model: ModelConfig) -> list[tuple[str, str]]:
    """(GPTModel prefix, prefix inside the piece) of each parameter-holding pipeline piece, by
    layer index: how `layer_LL-model_TT-model_states.pt` files map to GPTModel names."""
    out = [("embedding.", EMBEDDING_WRAPS)]
    out += [(f"blocks.{i}.", BLOCK_WRAPS) for i in range(model.num_layers)]
    return out + [("output.", OUTPUT_WRAPS)]


def universal_dir(step_dir: Path) -> Path:
    return step_dir / UNIVERSAL


def read_universal_meta(step_dir: Path) -> dict[str, Any] | None:
    meta = universal_dir(step_dir) / UNIVERSAL_META
    return json.loads(meta.read_text()) if meta.is_file() else None


def is_checkpoint(path: Path) -> bool:
    """A save directory (with `latest`) or one `global_stepN` of ours (config.yml inside)."""
    return (path / LATEST).is_file() or (path / CONFIG).is_file()
