"""How each parameter is split across tensor-parallel ranks, and the two directions.

One table (by parameter name) serves model init under TP, resharding checkpoints between
layouts and merging shards for export, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.config.schema import ModelConfig


@dataclass(frozen=True)
class Spec:
    kind: str  # "replicated", "split" (contiguous along dim) or "qkv" (q, k, v parts separately)
    dim: int = 0


REPLICATED = Spec("replicated")

_RULES: tuple[tuple[str, Spec], ...] = (
    ("embed.weight", Spec("split", 0)),  # vocabulary rows
    ("head.weight", Spec("split", 0)),
    ("attn.qkv.weight", Spec("qkv", 0)),
    ("attn.qkv.bias", Spec("qkv", 0)),
    ("attn.dense.weight", Spec("split", 1)),
    ("mlp.up.weight", Spec("split", 0)),
    ("mlp.up.bias", Spec("split", 0)),
    ("mlp.gate.weight", Spec("split", 0)),
    ("mlp.gate.bias", Spec("split", 0)),
    ("mlp.down.weight", Spec("split", 1)),
)


def spec_for(name: str) -> Spec:
    for suffix, spec in _RULES:
        if name == suffix or name.endswith("." + suffix):
            return spec
    return REPLICATED


def _qkv_sizes(m: ModelConfig) -> list[int]:
    return list(m.qkv_sizes)


def shard(name: str, full: torch.Tensor, m: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a full tensor."""
    spec = spec_for(name)
    if size == 1 or spec.kind == "replicated":
        return full
    if spec.kind == "split":
        return full.chunk(size, spec.dim)[rank].contiguous()
    parts = full.split(_qkv_sizes(m), 0)
    return torch.cat([p.chunk(size, 0)[rank] for p in parts], 0).contiguous()


def unshard(name: str, pieces: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """The full tensor from every rank's piece (in rank order)."""
    spec = spec_for(name)
    if len(pieces) == 1 or spec.kind == "replicated":
        return pieces[0]
    if spec.kind == "split":
        return torch.cat(pieces, spec.dim)
    size = len(pieces)
    local = [s // size for s in _qkv_sizes(m)]
    split = [p.split(local, 0) for p in pieces]  # per rank: (q, k, v)
    return torch.cat([torch.cat([s[i] for s in split], 0) for i in range(3)], 0)


def shard_state(
    state: dict[str, torch.Tensor], m: ModelConfig, rank: int, size: int
) -> dict[str, torch.Tensor]:
    return {k: shard(k, v, m, rank, size) for k, v in state.items()}
