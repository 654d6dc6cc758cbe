"""Architecture configs both ways: our `ModelConfig` <-> a transformers GPT-NeoX / Llama config
(and Qwen2 = Llama with q/k/v biases; Mistral without sliding window reads as Llama).

Both directions are exact or refuse: an option the other side cannot express raises
`UnmappedOption` naming it, because a config that loads strictly but describes another
architecture gives other logits without a word (GPT-NeoX's converter issues #1208, #1337).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.config.schema import ModelConfig


class UnmappedOption(ValueError):
    """An architecture option the target format cannot express (its name is in the message)."""


def family(m: ModelConfig) -> str:
    """Key-name family: 'llama' (Llama, Qwen2, Mistral names) or 'neox'."""
    return "llama" if (m.norm == "rmsnorm" and m.activation == "swiglu") else "neox"


HF_ARCHITECTURES = {
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def hf_model_type(m: ModelConfig) -> str:
    """The transformers model_type that expresses `m`: qwen2 for biased q/k/v without an
    output bias (Qwen2's layout), else llama / gpt_neox."""
    if family(m) == "neox":
        return "gpt_neox"
    return "qwen2" if m.qkv_bias and not m.use_bias_in_attn_linear else "llama"


def unmapped_options(m: ModelConfig) -> list[str]:
    """Why `m` cannot be written as a transformers GPT-NeoX / Llama config (empty: it can)."""
    why = []
    if m.pos_emb != "rotary":
        why.append(f"pos_emb: {m.pos_emb} (GPT-NeoX and Llama use rotary only)")
    combo = (m.norm, m.activation)
    if combo not in (("layernorm", "gelu"), ("rmsnorm", "swiglu")):
        why.append(
            f"norm: {m.norm} with activation: {m.activation} (GPT-NeoX is layernorm + gelu, "
            "Llama is rmsnorm + swiglu)"
        )
        return why
    if family(m) == "neox":
        if m.kv_heads != m.num_attention_heads:
            why.append(
                f"num_kv_heads: {m.kv_heads} != num_attention_heads {m.num_attention_heads} "
                "(GPT-NeoX has no grouped-query attention)"
            )
        if not m.use_bias_in_mlp:
            why.append("use_bias_in_mlp: false (GPT-NeoX's MLP always has biases)")
        if not m.use_bias_in_norms:
            why.append("use_bias_in_norms: false (GPT-NeoX's LayerNorms always have biases)")
        if m.qkv_bias != m.use_bias_in_attn_linear:
            why.append("use_bias_in_qkv != use_bias_in_attn_linear (GPT-NeoX biases all or none)")
    else:
        if m.use_bias_in_attn_linear and not m.qkv_bias:
            why.append("use_bias_in_qkv: false with an output bias (no transformers family)")
        if hf_model_type(m) == "qwen2" and m.use_bias_in_mlp:
            why.append("use_bias_in_mlp: true with Qwen2's q/k/v-only biases (Qwen2 has none)")
        if m.rotary_pct != 1.0:
            why.append(f"rotary_pct: {m.rotary_pct} (Llama rotates the whole head)")
        if m.gpt_j_residual:
            why.append("gpt_j_residual: true (Llama has no parallel residual)")
    return why


def check_exportable(m: ModelConfig) -> None:
    why = unmapped_options(m)
    if why:
        raise UnmappedOption("cannot express as a transformers model: " + "; ".join(why))


def hf_config(m: ModelConfig, vocab_size: int) -> Any:
    """A transformers config describing the same architecture (refuses what it cannot)."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config  # deferred: heavy

    check_exportable(m)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.ffn_size,
        max_position_embeddings=m.max_positions,
        tie_word_embeddings=not m.no_weight_tying,
        attention_dropout=m.attention_dropout,
    )
    if family(m) == "neox":
        return GPTNeoXConfig(
            **common,
            hidden_act="gelu",
            hidden_dropout=m.hidden_dropout,
            layer_norm_eps=m.layernorm_epsilon,
            use_parallel_residual=m.gpt_j_residual,
            attention_bias=m.use_bias_in_attn_linear,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": m.rotary_emb_base,
                "partial_rotary_factor": m.rotary_pct,
            },
        )
    if hf_model_type(m) == "qwen2":
        return Qwen2Config(
            **common,
            hidden_act="silu",
            num_key_value_heads=m.kv_heads,
            rms_norm_eps=m.layernorm_epsilon,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": m.rotary_emb_base},
        )
    return LlamaConfig(
        **common,
        hidden_act="silu",
        num_key_value_heads=m.kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.layernorm_epsilon,
        attention_bias=m.use_bias_in_attn_linear,
        mlp_bias=m.use_bias_in_mlp,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_emb_base},
    )


def _rope(c: Any) -> dict[str, Any]:
    """rope_theta / partial factor from transformers 5 `rope_parameters` (or the older
    top-level keys); any rope_type but default (scaling schemes) is refused."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    scaling = getattr(c, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        rope.setdefault("rope_type", scaling.get("rope_type", scaling.get("type")))
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise UnmappedOption(f"rope_type: {kind} (only the default rotary embedding is mapped)")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
    return {"rotary_emb_base": float(theta), "rotary_pct": float(pct)}


def _neox_fields(c: Any) -> dict[str, Any]:
    if c.hidden_act != "gelu":
        raise UnmappedOption(f"hidden_act: {c.hidden_act} (our GPT-NeoX MLP is exact gelu)")
    return dict(
        activation="gelu",
        norm="layernorm",
        gpt_j_residual=bool(c.use_parallel_residual),
        layernorm_epsilon=float(c.layer_norm_eps),
        use_bias_in_attn_linear=bool(getattr(c, "attention_bias", True)),
        use_bias_in_mlp=True,
        use_bias_in_norms=True,
        hidden_dropout=float(getattr(c, "hidden_dropout", 0.0)),
    )


def _llama_fields(c: Any) -> dict[str, Any]:
    if c.hidden_act != "silu":
        raise UnmappedOption(f"hidden_act: {c.hidden_act} (our Llama MLP is swiglu = silu gate)")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise UnmappedOption(
            f"head_dim: {head_dim} * num_attention_heads {c.num_attention_heads} != "
            f"hidden_size {c.hidden_size} (our heads split the hidden size)"
        )
    if getattr(c, "pretraining_tp", 1) not in (None, 1):
        raise UnmappedOption(f"pretraining_tp: {c.pretraining_tp} (only 1 is mapped)")
    return dict(
        activation="swiglu",
        norm="rmsnorm",
        num_kv_heads=int(c.num_key_value_heads or c.num_attention_heads),
        layernorm_epsilon=float(c.rms_norm_eps),
        use_bias_in_attn_linear=bool(getattr(c, "attention_bias", False)),
        use_bias_in_mlp=bool(getattr(c, "mlp_bias", False)),
    )


def _llama_like_fields(c: Any, kind: str) -> dict[str, Any]:
    """Llama, and the families that are Llama with a twist our model expresses: Qwen2
    (q/k/v biases, no output or MLP bias) and Mistral (without sliding window)."""
    window = getattr(c, "sliding_window", None)
    if kind == "mistral" and window is not None:
        raise UnmappedOption(f"sliding_window: {window} (our attention has no sliding window)")
    if kind == "qwen2" and getattr(c, "use_sliding_window", False):
        raise UnmappedOption("use_sliding_window: true (our attention has no sliding window)")
    fields = _llama_fields(c)
    if kind == "qwen2":
        fields.update(use_bias_in_qkv=True, use_bias_in_attn_linear=False, use_bias_in_mlp=False)
    return fields


MAPPED = ("gpt_neox", "llama", "qwen2", "mistral")


def config_from_hf(c: Any, seq_length: int | None = None) -> ModelConfig:
    """A transformers GPT-NeoX / Llama / Qwen2 / Mistral config -> the ModelConfig of the
    same model.

    `seq_length` (the training length) defaults to max_position_embeddings."""
    kind = getattr(c, "model_type", None)
    if kind not in MAPPED:
        raise UnmappedOption(f"model_type: {kind} (mapped: {', '.join(MAPPED)})")
    fields = _neox_fields(c) if kind == "gpt_neox" else _llama_like_fields(c, kind)
    fields.update(_rope(c))
    if kind != "gpt_neox" and fields["rotary_pct"] != 1.0:
        raise UnmappedOption(f"partial_rotary_factor: {fields['rotary_pct']} on {kind}")
    mpe = int(c.max_position_embeddings)
    fields.update(
        num_layers=int(c.num_hidden_layers),
        hidden_size=int(c.hidden_size),
        num_attention_heads=int(c.num_attention_heads),
        intermediate_size=int(c.intermediate_size),
        max_position_embeddings=mpe,
        seq_length=min(seq_length or mpe, mpe),
        no_weight_tying=not bool(getattr(c, "tie_word_embeddings", False)),
        pos_emb="rotary",
        attention_dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0),
        make_vocab_size_divisible_by=1,  # the HF vocabulary is already the padded one
    )
    return ModelConfig(**fields)


def model_config_dict(m: ModelConfig) -> dict[str, Any]:
    """The model keys of a YAML config (flat NeoX names), as our loader reads them."""
    return dataclasses.asdict(m)
