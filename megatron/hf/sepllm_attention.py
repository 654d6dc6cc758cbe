"""SepLLM inside stock transformers: the trained (or training-free) kept rule and our
streaming caches on Llama-style decoders, without patching transformers.

    model = AutoModelForCausalLM.from_pretrained(folder)
    apply_sepllm(model)                                  # config.json's `sepllm` entry
    apply_sepllm(model, separator_ids, init_tokens=4, local_window=256)   # training-free
    model.generate(ids, past_key_values=cache, max_new_tokens=64)   # cache: hf_cache's

Why an explicit `apply_sepllm(model)`: transformers hands neither attention functions nor
cache layers the token ids, and both need them (which keys are separators). The generation
loop holds them only in the model's forward call, so the one place they can be read at the
time they are needed is that call: `apply_sepllm` registers a forward pre-hook and a forward
hook on *this model instance* (torch's `register_forward_pre_hook(..., with_kwargs=True)`,
removed by `SepLLM.remove()`), which

  * with one of our streaming caches (megatron/inference/hf_cache.py) as `past_key_values`:
    hands it the step's ids and padding mask (`begin_step`), and replaces `position_ids` and
    `attention_mask` by the ones the cache implies (positions under positional shift; the
    validity of its held slots, which a compacted cache no longer shares with the text's 2D
    mask), then compresses it after the forward (`end_step`);
  * for the kept rule (`sepllm` / `streamingllm` modes): passes the call's SepLLM inputs to
    every attention layer as the keyword argument `sepllm_call` (transformers forwards the
    model's extra keyword arguments to the attention function), so layers read the ids of
    their own call, never state another layer left behind.

A LogitsProcessor sees the ids only after the forward that needed them (and never the
prompt's before the prefill); a custom generate loop would not be `model.generate`. The
attention function is registered as "sepllm" with transformers' `AttentionInterface` (and a
no-op `AttentionMaskInterface` entry: the kept set is the mask). Mode `full` (no `sepllm`
entry) keeps the model's own attention: only the cache's ids, positions and mask are routed.

Families: every decoder whose transformers attention calls `AttentionInterface` with standard
or partial RoPE (`SUPPORTED`); what cannot be exact is refused by name (`check_family`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megatron.config.schema import SepLLMConfig
from megatron.model.cache import KVCache, check_separators, kernel_name, layer_kept
from megatron.sepllm.info import KeptSet, build_kept_set
from megatron.sepllm.kernels import get_kernel

NAME = "sepllm"
CALL_KWARG = "sepllm_call"
Tensor = torch.Tensor
# model_type -> what it is; each has a tiny-model test in tests/hf/test_sepllm_families.py
SUPPORTED = {
    "llama": "Llama 2 / 3.x",
    "gpt_neox": "GPT-NeoX / Pythia (partial RoPE)",
    "qwen2": "Qwen2 / Qwen2.5 (qkv bias)",
    "qwen3": "Qwen3 (q/k norms)",
    "mistral": "Mistral (without sliding window)",
    "gemma2": "Gemma 2 (without sliding-window layers or logit soft-capping)",
    "gemma3_text": "Gemma 3 text (without sliding-window layers)",
    "phi3": "Phi-3 (partial RoPE, fused qkv; default rope only)",
}
EXACT_ROPE = ("default", "linear", "llama3")  # fixed inv_freq, attention_scaling 1


@dataclass(frozen=True)
class SepRule:
    """The kept rule of a transformers model: the sepllm section and per-layer windows."""

    sep: SepLLMConfig
    windows: list[int]
    full: list[bool]  # layer i trained with full attention (window >= seq_length)


@dataclass
class SepCall:
    """One forward's SepLLM inputs, handed to each attention layer as `sepllm_call`."""

    rule: SepRule
    stream: KVCache | None  # our streaming cache's bookkeeping, or None
    kept: KeptSet | None  # without a streaming cache: the kept set of the whole call


def rule_of(config: Any) -> SepRule:
    """The `sepllm` entry of a transformers config (absent: mode full)."""
    entry = dict(getattr(config, "sepllm", None) or {"mode": "full"})
    names = set(SepLLMConfig.__dataclass_fields__)
    sep = SepLLMConfig(**{k: v for k, v in entry.items() if k in names})
    if sep.mode not in ("full", "sepllm", "streamingllm"):
        raise ValueError(f"sepllm entry: mode {sep.mode!r} (full, sepllm or streamingllm)")
    n = config.num_hidden_layers
    seq = entry.get("seq_length") or config.max_position_embeddings
    windows = list(entry.get("local_window_per_layer") or sep.layer_windows(n, seq))
    if len(windows) != n:
        raise ValueError(f"sepllm entry: {len(windows)} per-layer windows for {n} layers")
    full = [sep.mode == "full" or w >= seq for w in windows]
    return SepRule(sep, windows, full)


def check_family(config: Any) -> None:
    """Refuse, by name, what the kept rule or the caches cannot reproduce exactly."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(
            f"SepLLM on transformers model_type {kind!r} is not supported; supported: "
            f"{', '.join(sorted(SUPPORTED))}"
        )
    types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in types or (
        window is not None and not types and getattr(config, "use_sliding_window", True)
    )
    if sliding and window is not None and window < config.max_position_embeddings:
        raise ValueError(
            f"{kind}: sliding-window attention layers (sliding_window={window}) conflict with "
            "the SepLLM kept rule and the streaming caches (both decide which keys stay); set "
            "sliding_window to None or layer_types to full_attention"
        )
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"{kind}: attn_logit_softcapping={softcap} has no SepLLM kernel")
    rope = getattr(config, "rope_parameters", None) or {}
    # one dict, or one per layer type (Gemma 3)
    per_type = [v for v in rope.values() if isinstance(v, dict)] or [rope]
    for params in per_type:
        rope_type = params.get("rope_type", "default")
        if rope_type not in EXACT_ROPE:
            raise ValueError(
                f"{kind}: rope_type {rope_type!r} cannot be re-rotated exactly (its frequencies "
                f"or scaling depend on the length); exact: {', '.join(EXACT_ROPE)}"
            )


class SepLLM:
    """What `apply_sepllm` installed on one model: its rule and its two hooks."""

    def __init__(self, model: nn.Module, rule: SepRule) -> None:
        self.model, self.rule = model, rule
        # Token ids so far per transformers cache that does not evict (DynamicCache): decode
        # steps over it need the ids of every held key.
        self.history: weakref.WeakKeyDictionary[Any, Tensor] = weakref.WeakKeyDictionary()
        self.open: Any = None  # the streaming cache of the forward in progress
        self.hooks = [
            model.register_forward_pre_hook(self.before, with_kwargs=True),
            model.register_forward_hook(self.after, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.model.__dict__.pop("_sepllm", None)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        stream = getattr(cache, "stream", None)
        if stream is None and self.rule.sep.mode == "full":
            return args, kwargs  # the model's own attention over its own cache
        if ids is None:
            raise ValueError("SepLLM needs input_ids (inputs_embeds carry no token ids)")
        kept = None
        if stream is not None:  # one of our streaming caches
            mask = kwargs.get("attention_mask")
            mask = mask[:, -ids.shape[1] :] if mask is not None else None
            sep = self.rule.sep
            check_separators(stream, sep.mode, list(sep.separator_token_ids))
            kwargs["position_ids"], kwargs["attention_mask"] = cache.begin_step(ids, mask)
            self.open = cache
        elif self.rule.sep.mode != "full":
            kept = self._kept(ids, cache)
        if self.rule.sep.mode != "full":
            kwargs[CALL_KWARG] = SepCall(self.rule, stream, kept)
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.open is not None:
            cache, self.open = self.open, None
            cache.end_step()

    def _kept(self, ids: Tensor, cache: Any) -> KeptSet:
        """Kept set of a call over a cache that keeps every key (or no cache)."""
        past = int(cache.get_seq_length()) if cache is not None else 0
        history = ids
        if past:
            held = self.history.get(cache)
            if held is None or held.shape[1] != past:
                raise RuntimeError(
                    f"sepllm attention: the cache holds {past} keys but their ids are unknown "
                    "(a cache that evicts must be one of megatron.inference.hf_cache's)"
                )
            history = torch.cat([held, ids], dim=1)
        if cache is not None:
            self.history[cache] = history
        full = build_kept_set(history, self.rule.sep)
        assert full is not None  # mode is sepllm or streamingllm
        if not past:
            return full
        return KeptSet.from_cache(
            full.key_pos, full.is_sep, full.init_start, full.init_tokens, full.key_pos[:, past:]
        )


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
    call: SepCall | None = kwargs.get(CALL_KWARG)
    if call is None:
        raise RuntimeError(
            'attn_implementation="sepllm" needs apply_sepllm(model) (it hands each call\'s '
            "token ids to attention)"
        )
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"sepllm attention: {name}={kwargs[name]} is not supported")
    d = query.shape[-1]
    if scaling is not None and abs(scaling - d**-0.5) > 1e-12:
        query = query * (scaling * d**0.5)  # our kernels scale by 1/sqrt(D)
    q_len, kv_len = query.shape[2], key.shape[2]
    i = module.layer_idx
    window, full = call.rule.windows[i], call.rule.full[i]
    kept = call.kept
    if call.stream is not None:
        kept, window = layer_kept(call.stream.layer(i), q_len, call.rule.sep, window, full)
    name = kernel_name(
        call.rule.sep, kept, q_len, kv_len, window, d, dropout, device_type=query.device.type
    )
    out = get_kernel(name, call.rule.sep)(
        query, key, value, window=window, kept=kept, dropout_p=dropout
    )
    return out.transpose(1, 2).contiguous(), None  # [B, Sq, H, D], as transformers expects


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # the kept set, built from the ids, is the mask


def apply_sepllm(
    model: nn.Module,
    separator_ids: list[int] | None = None,
    init_tokens: int = 4,
    local_window: int = 256,
    mode: str = "sepllm",
    local_window_per_layer: list[int] | None = None,
    pad_token_id: int = 0,
) -> SepLLM:
    """Make `model` run SepLLM (and stream with our caches) in its own forward and generate.

    Without `separator_ids`, the rule is the config's `sepllm` entry (an exported SepLLM
    model's; absent: mode full, the model's own attention over the streaming caches). With
    them (or mode='streamingllm'), the training-free rule (initial a, separators, window w) is
    written to the config's `sepllm` entry first. Calling it again replaces the rule."""
    check_family(model.config)
    if separator_ids is not None or mode != "sepllm":
        model.config.sepllm = {
            "mode": mode,
            "separator_token_ids": list(separator_ids or []),
            "init_tokens": init_tokens,
            "local_window": local_window,
            "local_window_per_layer": local_window_per_layer,
            "pad_token_id": pad_token_id,
            "seq_length": model.config.max_position_embeddings,
        }
    rule = rule_of(model.config)
    old = getattr(model, "_sepllm", None)
    if old is not None:
        old.remove()
    if rule.sep.mode != "full":
        register()
        model.set_attn_implementation(NAME)
    handle = SepLLM(model, rule)
    model._sepllm = handle
    return handle


def register() -> None:
    """The "sepllm" entries of transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, sepllm_attention)
    AttentionMaskInterface.register(NAME, _no_mask)


register()  # so from_pretrained(..., attn_implementation="sepllm") finds the name
