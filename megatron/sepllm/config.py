"""The `sepllm` config section: which (query, key) pairs attention keeps.

It lives in the sepllm package, which depends on nothing else of ours, so the kernels and the
kept-set builder take it without importing the config package; megatron.config.schema
re-exports it as one section of the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SepLLMMode = Literal["full", "sepllm", "streamingllm"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field with its help text and, for numbers, its range (ge / gt / le / lt)."""
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SepLLMConfig:
    mode: SepLLMMode = _f(
        "full", "Attention pattern: full (dense causal), sepllm, or streamingllm (no separators)."
    )
    separator_token_ids: list[int] = _f(
        [], "Token ids treated as separators (tools/sepllm/separator_ids.py derives them)."
    )
    init_tokens: int = _f(4, "a: number of initial (sink) tokens always kept.", ge=0)
    local_window: int = _f(256, "w: local window including the diagonal.", ge=1)
    local_window_per_layer: list[int] | None = _f(
        None, "Per-layer windows (length num_layers); a window >= seq_length = full attention."
    )
    pad_token_id: int = _f(0, "Padding id, used to find the first real token of each row.", ge=0)
    batch_adaptive_init_pos: bool = _f(
        False, "Initial tokens are the first `a` non-pad tokens of each row (left padding)."
    )
    attention_kernel: str = _f(
        "auto",
        "Inner attention kernel: auto (fastest measured for the device and length), dense (mask "
        "reference), compact, flex, triton; sa / sa_no_deno: Self-Adjust softmax "
        "(docs/sepllm_variants.md).",
    )
    sa_numerator_bias: float = _f(
        0.0, "Self-Adjust softmax (attention_kernel sa): bias added to the numerator."
    )
    sa_denominator_bias: float = _f(
        1e-10, "Self-Adjust softmax (attention_kernel sa): bias added to the denominator.", gt=0
    )
    bipe: bool = _f(
        False,
        "BiPE: learned intra-segment position embedding + RoPE on the inter-segment index "
        "(needs pos_emb rotary; docs/sepllm_variants.md).",
    )
    bipe_separator_token_ids: list[int] | None = _f(
        None, "Token ids that end a BiPE segment; None: separator_token_ids."
    )
    print_kv_ratio: bool = _f(False, "Log kept-KV ratio and attention density.")
    print_ratio_intervals: int = _f(100, "Steps between kept-ratio log lines.", ge=1)

    def layer_windows(self, num_layers: int, seq_length: int) -> list[int]:
        """Window of each layer; seq_length (= full causal attention) everywhere in mode full."""
        if self.mode == "full":
            return [seq_length] * num_layers
        if self.local_window_per_layer:
            return list(self.local_window_per_layer)
        return [self.local_window] * num_layers
