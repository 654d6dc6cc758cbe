"""SepLLM attention inside stock transformers (GPT-NeoX and Llama), without patching it.

Importing this module registers the name "sepllm" with transformers' `AttentionInterface`
(the attention function: our kernels over our kept set) and `AttentionMaskInterface` (no
mask: the kept set replaces it). Then

    AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sepllm")

runs the kept set described by the `sepllm` entry of the folder's config.json (written by
tools/ckpts/convert_neox_to_hf.py), and `apply_sepllm(model, separator_ids, a, w)` does the
same training-free on any GPT-NeoX / Llama model (the paper's training-free setting).

How the token ids reach attention: transformers passes attention functions the q/k/v states,
never the ids, and the kept set depends on which ids are separators. A global forward
pre-hook (torch's `register_module_forward_pre_hook`) notices each model whose config selects
"sepllm" the first time it runs and attaches, once, a hook on its input embedding that
records the ids of every call; each attention layer of that model holds the same state, and
layer 0 of each forward builds the kept set for all layers. With a KV cache (generate) the
ids accumulate: a forward whose keys outnumber its queries is a decode step over the ids so
far (mask-only, nothing evicted; streaming eviction lives in megatron/inference).
Padding masks from `attention_mask` are not applied (as in our training); left-padded batches
need `batch_adaptive_init_pos`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megatron.config.schema import SepLLMConfig
from megatron.sepllm.info import KeptSet, build_kept_set
from megatron.sepllm.kernels import flex_available, get_kernel, select_kernel, triton_available

NAME = "sepllm"
Tensor = torch.Tensor


@dataclass
class SepState:
    """Per-model SepLLM state shared by its attention layers."""

    sep: SepLLMConfig
    windows: list[int]
    new_ids: Tensor | None = None
    history: Tensor | None = None
    kept: KeptSet | None = None
    hooks: list[Any] = field(default_factory=list)

    def record(self, ids: Tensor) -> None:
        self.new_ids = ids

    def kept_for(self, q_len: int, kv_len: int) -> KeptSet:
        """Layer 0 updates the history and builds the kept set; later layers reuse it."""
        if self.new_ids is None:
            raise RuntimeError("sepllm attention: no token ids recorded (inputs_embeds given?)")
        if q_len == kv_len or self.history is None:
            self.history = self.new_ids
        else:
            self.history = torch.cat([self.history, self.new_ids], 1)
        if self.history.shape[1] != kv_len:
            raise RuntimeError(
                f"sepllm attention: {self.history.shape[1]} ids recorded for {kv_len} keys "
                "(a cache that evicts keys needs megatron.inference's SepCache)"
            )
        full = build_kept_set(self.history, self.sep)
        assert full is not None  # mode is sepllm or streamingllm (checked in _state)
        if q_len == kv_len:
            self.kept = full
        else:
            self.kept = KeptSet.from_cache(
                full.key_pos, full.is_sep, full.init_start, full.init_tokens,
                full.key_pos[:, kv_len - q_len :],
            )  # fmt: skip
        return self.kept


def _state(config: Any) -> SepState:
    entry = getattr(config, "sepllm", None)
    if not entry:
        raise ValueError(
            'attn_implementation="sepllm" needs a `sepllm` entry in the config (an exported '
            "SepLLM model has one; otherwise call apply_sepllm(model, separator_ids, a, w))"
        )
    names = {f for f in SepLLMConfig.__dataclass_fields__}
    sep = SepLLMConfig(**{k: v for k, v in entry.items() if k in names})
    if sep.mode not in ("sepllm", "streamingllm"):
        raise ValueError(f"sepllm entry: mode {sep.mode!r} (sepllm or streamingllm)")
    n = config.num_hidden_layers
    seq = entry.get("seq_length") or config.max_position_embeddings
    windows = list(entry.get("local_window_per_layer") or sep.layer_windows(n, seq))
    if len(windows) != n:
        raise ValueError(f"sepllm entry: {len(windows)} per-layer windows for {n} layers")
    return SepState(sep, windows)


def attach(model: nn.Module) -> SepState:
    """Give `model`'s attention layers one shared state and record its input ids."""
    existing = getattr(model, "_sepllm_state", None)
    if existing is not None:
        return existing
    state = _state(model.config)
    emb = model.get_input_embeddings()
    state.hooks.append(emb.register_forward_pre_hook(lambda _m, args: state.record(args[0])))
    for module in model.modules():
        # attention layers (they carry layer_idx) and the inner model sharing this config,
        # so the global hook stops at the first lookup from now on
        if hasattr(module, "layer_idx") or getattr(module, "config", None) is model.config:
            module._sepllm_state = state
    return state


def _global_pre_hook(module: nn.Module, args: Any) -> None:
    """Cheap for every other module: one attribute lookup."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != NAME:
        return
    if getattr(module, "_sepllm_state", None) is None and hasattr(module, "get_input_embeddings"):
        attach(module)


def sepllm_attention(
    module: nn.Module,
    query: Tensor,  # [B, H, Sq, D]
    key: Tensor,  # [B, Hkv, Sk, D]
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    state: SepState | None = getattr(module, "_sepllm_state", None)
    if state is None:
        raise RuntimeError("sepllm attention: this model was not prepared (see apply_sepllm)")
    d = query.shape[-1]
    if scaling is not None and abs(scaling - d**-0.5) > 1e-12:
        raise ValueError(f"sepllm attention: scaling {scaling} != 1/sqrt(head_dim)")
    q_len, kv_len = query.shape[2], key.shape[2]
    layer = module.layer_idx
    kept = state.kept_for(q_len, kv_len) if layer == 0 or state.kept is None else state.kept
    window = state.windows[layer]
    name = select_kernel(
        state.sep.attention_kernel,
        device_type=query.device.type,
        q_len=q_len,
        kv_len=kv_len,
        window=window,
        head_dim=d,
        dropout_p=dropout,
        flex_available=flex_available(),
        triton_available=triton_available(query.device.type),
        mode=state.sep.mode,
        aligned=kept.aligned,
    )
    out = get_kernel(name)(query, key, value, window=window, kept=kept, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None  # [B, Sq, H, D], as transformers expects


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # the kept set, built from the ids, is the mask


def apply_sepllm(
    model: nn.Module,
    separator_ids: list[int],
    init_tokens: int,
    local_window: int,
    mode: str = "sepllm",
    local_window_per_layer: list[int] | None = None,
    pad_token_id: int = 0,
) -> SepState:
    """Training-free SepLLM on a loaded transformers GPT-NeoX / Llama model."""
    model.config.sepllm = {
        "mode": mode,
        "separator_token_ids": list(separator_ids),
        "init_tokens": init_tokens,
        "local_window": local_window,
        "local_window_per_layer": local_window_per_layer,
        "pad_token_id": pad_token_id,
        "seq_length": model.config.max_position_embeddings,
    }
    old = getattr(model, "_sepllm_state", None)
    if old is not None:
        for h in old.hooks:
            h.remove()
        for module in model.modules():
            module.__dict__.pop("_sepllm_state", None)
    model.set_attn_implementation(NAME)
    return attach(model)


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, sepllm_attention)
    AttentionMaskInterface.register(NAME, _no_mask)


register()
_HOOK = torch.nn.modules.module.register_module_forward_pre_hook(_global_pre_hook)
