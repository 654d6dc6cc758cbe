"""The streaming caches as a transformers Cache, so any decoder that `apply_sepllm` accepts
streams with SepCache / sink / full policies through transformers' own Cache API (a
`CacheLayerMixin` subclass per layer) and its own `generate`, without patching transformers:

    apply_sepllm(model)                               # once: megatron/hf/sepllm_attention.py
    cache = sep_cache(model, init=4, sep=64, local=256, capacity=512)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)

Token ids reach the cache through the model call: the hooks `apply_sepllm` installs call
`cache.begin_step(ids, attention_mask)` before each forward and `cache.end_step()` (which
compresses) after it; `begin_step` returns the inputs the model needs instead of the
generation loop's:

  * position_ids: the cache's positions of the new tokens (cache index under shift, else text
    position). transformers rotates queries and new keys by them and hands the layer rotated
    keys; the layer stores them with that rotation and, under shift, re-rotates moved keys by
    the delta only (caches.py), never as if raw.
  * attention_mask [B, L + n]: the held slots' validity ++ the new tokens' (left padding and
    rows compacted to different lengths leave invalid slots). A model with its own attention
    builds its causal mask from it and `get_mask_sizes` (kv length L + n, offset 0); the
    "sepllm" attention applies the kept rule over the held keys instead.

transformers computes one rotary table for all layers, so every layer must use the same
policy (checked); per-layer sizes work with our checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from megatron.inference.caches import LayerCache, Rotary, StreamCache, make_policies


class StreamLayer(CacheLayerMixin):
    """One transformers cache layer backed by a `LayerCache` of a `StreamCache`."""

    is_sliding = False

    def __init__(self, stream: StreamCache, index: int) -> None:
        super().__init__()
        self.stream, self.index = stream, index

    @property
    def store(self) -> LayerCache:
        return self.stream.layer(self.index)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.stream.step
        if step is None:
            raise RuntimeError(
                "StreamingCache: the model does not hand the cache its token ids; call "
                "megatron.hf.sepllm_attention.apply_sepllm(model) once before using it"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = self.store.positions(step)  # what begin_step gave the model as position_ids
        self.keys, self.values = self.store.append(key_states, value_states, step, pos)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.length  # slots, valid or not: the attention mask marks the invalid

    def get_max_length(self) -> int:
        return -1


class StreamingCache(Cache):
    """A transformers Cache whose layers follow a `StreamCache`'s policies."""

    def __init__(self, stream: StreamCache) -> None:
        kinds = {(p.kind, p.init, p.sep, p.local, p.capacity, p.grow) for p in _policies(stream)}
        if len(kinds) != 1:
            raise ValueError(
                "a transformers model needs the same cache sizes in every layer (one rotary "
                "table and one attention mask serve all its layers); per-layer sizes work with "
                "our checkpoints"
            )
        super().__init__(layers=[StreamLayer(stream, i) for i in range(len(stream.layers))])
        self.stream = stream
        self.fed = 0  # token columns handed to the model so far (padding included)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed, as for transformers' DynamicCache, so `generate` continues a
        conversation from the ids after them (the cache holds fewer once it evicts)."""
        return self.fed

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Slots held before the step's queries (what a model's own causal mask aligns to)."""
        return self.stream.layer(layer_idx).length

    def begin_step(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # position_ids [B, n], attention_mask [B, L + n]
        """Register the step's ids [B, n] (mask [B, n]: 1 real, 0 padding); the model's
        position_ids and attention mask for it."""
        step = self.stream.begin_step(ids, attention_mask)
        self.fed += ids.shape[1]
        layer = self.stream.layer(0)
        held = layer.valid if layer.length else step.valid[:, :0]
        return layer.positions(step), torch.cat([held, step.valid], dim=1).long()

    def end_step(self) -> None:
        self.stream.end_step()


def _policies(stream: StreamCache) -> list:
    return [layer.policy for layer in stream.layers]


def hf_rotary(model: torch.nn.Module) -> Rotary | None:
    """The model's RoPE frequencies as the cache's re-rotation spec (one table for every
    layer: a model whose layer types rotate differently, e.g. Gemma 3's sliding layers, is
    refused by name)."""
    rotary = getattr(getattr(model, "base_model", model), "rotary_emb", None)
    if rotary is None:
        return None
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    if scaling != 1.0:
        raise ValueError(f"rope with attention_scaling {scaling} cannot be re-rotated exactly")
    tables = {
        name: buf.detach().float()
        for name, buf in rotary.named_buffers()
        if name.endswith("inv_freq") and "original" not in name
    }
    distinct = {tuple(t.tolist()) for t in tables.values()}
    if len(distinct) != 1:
        raise ValueError(
            f"{type(rotary).__name__}: {len(distinct)} RoPE tables ({', '.join(sorted(tables))})"
            " cannot share one cache's re-rotation; use one layer type"
        )
    inv_freq = next(iter(tables.values()))
    return Rotary(inv_freq, 2 * inv_freq.numel())


def model_separators(model: torch.nn.Module) -> list[int]:
    """The separator ids of the model's `sepllm` config entry (empty without one)."""
    entry = getattr(model.config, "sepllm", None) or {}
    return [int(i) for i in entry.get("separator_token_ids") or []]


def streaming_cache(
    model: torch.nn.Module,
    kind: str = "sep",
    init: int = 4,
    sep: int = 64,
    local: int = 256,
    capacity: int = 512,
    separator_ids: Sequence[int] | None = None,
    pos_shift: bool = True,
    grow: bool = False,
) -> StreamingCache:
    """A SepCache ('sep'), StreamingLLM sink ('sink') or never-evicting ('full') cache for
    `model`; separator ids default to its `sepllm` entry's (the one list its kept rule
    reads)."""
    layers = int(model.config.num_hidden_layers)
    policies = make_policies(kind, layers, init, sep, local, capacity, grow=grow)
    seps = model_separators(model) if separator_ids is None else list(separator_ids)
    return StreamingCache(StreamCache(policies, seps, pos_shift, hf_rotary(model)))


def sep_cache(model: torch.nn.Module, **sizes: object) -> StreamingCache:
    """SepCache for `model` (streaming_cache with kind 'sep')."""
    return streaming_cache(model, "sep", **sizes)  # type: ignore[arg-type]


@torch.no_grad()
def hf_step(
    model: torch.nn.Module,
    cache: StreamingCache,
    ids: torch.Tensor,  # [B, n]
    attention_mask: torch.Tensor | None = None,  # [B, n]
) -> torch.Tensor:  # logits [B, n, V]
    """One forward of an `apply_sepllm`-prepared causal LM over the streaming cache."""
    out = model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return out.logits
