"""The streaming caches as a transformers Cache, so GPTNeoXForCausalLM / LlamaForCausalLM
stream with SepCache / sink / full policies through transformers' own Cache API (a
`CacheLayerMixin` subclass per layer), without patching transformers.

Token ids reach the cache by one documented call: `cache.begin_step(ids, attention_mask)`
before each forward, `cache.end_step()` after it (which compresses). `hf_step` does both and
passes the model the positions and the padding mask the cache implies:

  * position_ids: the cache's positions of the new tokens (cache index under shift, else text
    position). transformers rotates queries and new keys by them and hands the layer rotated
    keys; the layer stores them with that rotation and, under shift, re-rotates moved keys by
    the delta only (caches.py), never as if raw.
  * attention_mask [B, L + n]: the held slots' validity ++ the new tokens' (left padding and
    rows compacted to different lengths leave invalid slots). transformers builds its causal
    mask from it and `get_mask_sizes` (kv length L + n, offset 0).

The model attends to every held key (a transformers model has no SepLLM kept rule), so every
layer must use the same policy: one mask serves all layers (checked).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from megatron.inference.caches import LayerCache, Rotary, StreamCache


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
                "StreamingCache: call cache.begin_step(input_ids) before each forward (the cache "
                "needs the token ids to find separators); megatron.inference.hf_cache.hf_step does"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = self.store.positions(step)  # what hf_step passed as position_ids
        self.keys, self.values = self.store.append(key_states, value_states, step, pos)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

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
                "a transformers model needs the same cache sizes in every layer (one attention "
                "mask serves all its layers); per-layer sizes work with our checkpoints"
            )
        super().__init__(layers=[StreamLayer(stream, i) for i in range(len(stream.layers))])
        self.stream = stream

    def begin_step(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        self.stream.begin_step(ids, attention_mask)

    def end_step(self) -> None:
        self.stream.end_step()


def _policies(stream: StreamCache) -> list:
    return [layer.policy for layer in stream.layers]


def hf_rotary(model: torch.nn.Module) -> Rotary | None:
    """The model's RoPE frequencies as the cache's re-rotation spec."""
    rotary = getattr(getattr(model, "base_model", model), "rotary_emb", None)
    if rotary is None:
        return None
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if scaling != 1.0:
        raise ValueError(f"rope with attention_scaling {scaling} cannot be re-rotated exactly")
    inv_freq = rotary.inv_freq.detach().float()
    return Rotary(inv_freq, 2 * inv_freq.numel())


@torch.no_grad()
def hf_step(
    model: torch.nn.Module,
    cache: StreamingCache,
    ids: torch.Tensor,  # [B, n]
    attention_mask: torch.Tensor | None = None,  # [B, n]
) -> torch.Tensor:  # logits [B, n, V]
    """One forward of a transformers causal LM over the streaming cache."""
    stream = cache.stream
    step = stream.begin_step(ids, attention_mask)
    try:
        layer = stream.layer(0)
        positions = layer.positions(step)
        held = layer.valid if layer.length else step.valid[:, :0]
        mask = torch.cat([held, step.valid], dim=1).long()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
    finally:
        stream.end_step()
    return out.logits
