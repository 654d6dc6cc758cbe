"""Whole state dicts to and from tensor-parallel shards, by the layers' declared layouts.

The split of every parameter is declared by the layer that owns it (`Layout` in
`megatron/parallel/layers.py`); model init under TP, resharding checkpoints between layouts and
export all take `param_layouts(model)`, so they cannot disagree. Code holding only a state dict
and a config builds the model on the `meta` device to get them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron.parallel.layers import Layout, param_layouts

__all__ = ["param_layouts", "shard_state", "unshard_state"]


def _check_keys(keys: Sequence[str] | Mapping[str, object], layouts: Mapping[str, Layout]) -> None:
    unknown = [k for k in keys if k not in layouts]
    if unknown:
        raise KeyError(f"no declared layout for: {', '.join(unknown)}")


def shard_state(
    state: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout], rank: int, size: int
) -> dict[str, torch.Tensor]:
    """This rank's piece of every tensor of a full state dict (every key must have a layout)."""
    _check_keys(state, layouts)
    return {k: layouts[k].shard(v, rank, size) for k, v in state.items()}


def unshard_state(
    pieces: Sequence[Mapping[str, torch.Tensor]], layouts: Mapping[str, Layout]
) -> dict[str, torch.Tensor]:
    """The full state dict from every rank's state dict (in rank order)."""
    _check_keys(pieces[0], layouts)
    return {k: layouts[k].unshard([p[k] for p in pieces]) for k in pieces[0]}
