"""State-dict adapters between our GPTModel and transformers' GPTNeoX / Llama models.

One explicit key map per family, used by both directions. Our fused qkv is laid out
[q (H*D) | k (Hkv*D) | v (Hkv*D)]; GPT-NeoX's is per head [H, (q, k, v), D].
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.config.schema import ModelConfig

Tensor = torch.Tensor
EMBED, HEAD = "embedding.embed.weight", "output.head.weight"


def family(m: ModelConfig) -> str:
    return "llama" if (m.norm == "rmsnorm" and m.activation == "swiglu") else "neox"


def _neox_layer_map(i: int) -> dict[str, str]:
    p, h = f"blocks.{i}.", f"gpt_neox.layers.{i}."
    return {
        p + "ln1.weight": h + "input_layernorm.weight",
        p + "ln1.bias": h + "input_layernorm.bias",
        p + "ln2.weight": h + "post_attention_layernorm.weight",
        p + "ln2.bias": h + "post_attention_layernorm.bias",
        p + "attn.dense.weight": h + "attention.dense.weight",
        p + "attn.dense.bias": h + "attention.dense.bias",
        p + "mlp.up.weight": h + "mlp.dense_h_to_4h.weight",
        p + "mlp.up.bias": h + "mlp.dense_h_to_4h.bias",
        p + "mlp.down.weight": h + "mlp.dense_4h_to_h.weight",
        p + "mlp.down.bias": h + "mlp.dense_4h_to_h.bias",
    }


def _llama_layer_map(i: int) -> dict[str, str]:
    p, h = f"blocks.{i}.", f"model.layers.{i}."
    return {
        p + "ln1.weight": h + "input_layernorm.weight",
        p + "ln2.weight": h + "post_attention_layernorm.weight",
        p + "attn.dense.weight": h + "self_attn.o_proj.weight",
        p + "mlp.gate.weight": h + "mlp.gate_proj.weight",
        p + "mlp.up.weight": h + "mlp.up_proj.weight",
        p + "mlp.down.weight": h + "mlp.down_proj.weight",
    }


def _key_map(m: ModelConfig) -> dict[str, str]:
    fam = family(m)
    keys = (
        {
            EMBED: "gpt_neox.embed_in.weight",
            "output.final_norm.weight": "gpt_neox.final_layer_norm.weight",
            "output.final_norm.bias": "gpt_neox.final_layer_norm.bias",
        }
        if fam == "neox"
        else {EMBED: "model.embed_tokens.weight", "output.final_norm.weight": "model.norm.weight"}
    )
    layer = _neox_layer_map if fam == "neox" else _llama_layer_map
    for i in range(m.num_layers):
        keys.update(layer(i))
    return keys


def _split_qkv(w: Tensor, m: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    d = m.hidden_size // m.num_attention_heads
    kv = m.num_kv_heads or m.num_attention_heads
    return w.split([m.num_attention_heads * d, kv * d, kv * d], 0)


def to_hf(state: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> transformers state dict (GPTNeoXForCausalLM or LlamaForCausalLM)."""
    fam, keys, out = family(m), _key_map(m), {}
    for ours, theirs in keys.items():
        if ours in state:
            out[theirs] = state[ours]
    h, d = m.num_attention_heads, m.hidden_size // m.num_attention_heads
    for i in range(m.num_layers):
        for kind in ("weight", "bias"):
            w = state.get(f"blocks.{i}.attn.qkv.{kind}")
            if w is None:
                continue
            q, k, v = _split_qkv(w, m)
            if fam == "neox":  # [3, H, D, ...] -> [H, 3, D, ...]
                fused = torch.stack([t.reshape(h, d, *t.shape[1:]) for t in (q, k, v)], 1)
                out[f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"] = fused.reshape(
                    w.shape
                )
            else:
                for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"model.layers.{i}.self_attn.{name}.{kind}"] = t
    head = state.get(HEAD, state[EMBED])
    # transformers 5 names the GPT-NeoX head lm_head too (older checkpoints: embed_out).
    out["lm_head.weight"] = head
    return {k: v.clone() for k, v in out.items()}


def from_hf(hf_state: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """transformers state dict -> ours (the inverse of to_hf)."""
    fam, out = family(m), {}
    for ours, theirs in _key_map(m).items():
        if theirs in hf_state:
            out[ours] = hf_state[theirs]
    h, d = m.num_attention_heads, m.hidden_size // m.num_attention_heads
    for i in range(m.num_layers):
        for kind in ("weight", "bias"):
            if fam == "neox":
                w = hf_state.get(f"gpt_neox.layers.{i}.attention.query_key_value.{kind}")
                if w is None:
                    continue
                per_head = w.reshape(h, 3, d, *w.shape[1:])
                out[f"blocks.{i}.attn.qkv.{kind}"] = per_head.transpose(0, 1).reshape(w.shape)
            else:
                parts = [hf_state.get(f"model.layers.{i}.self_attn.{n}_proj.{kind}") for n in "qkv"]
                if parts[0] is not None:
                    out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
    if m.no_weight_tying:
        out[HEAD] = hf_state.get("lm_head.weight", hf_state.get("embed_out.weight"))
    return {k: v.clone() for k, v in out.items()}


def hf_config(m: ModelConfig, vocab_size: int) -> Any:
    """A transformers config describing the same architecture."""
    from transformers import GPTNeoXConfig, LlamaConfig  # noqa: PLC0415

    common = dict(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.ffn_size,
        max_position_embeddings=m.max_positions,
        tie_word_embeddings=not m.no_weight_tying,
    )
    if family(m) == "neox":
        return GPTNeoXConfig(
            **common,
            hidden_act="gelu",
            layer_norm_eps=m.layernorm_epsilon,
            use_parallel_residual=m.gpt_j_residual,
            attention_bias=m.use_bias_in_attn_linear,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": m.rotary_emb_base,
                "partial_rotary_factor": m.rotary_pct,
            },
        )
    return LlamaConfig(
        **common,
        num_key_value_heads=m.kv_heads,
        rms_norm_eps=m.layernorm_epsilon,
        attention_bias=m.use_bias_in_attn_linear,
        mlp_bias=m.use_bias_in_mlp,
        rope_parameters={"rope_type": "default", "rope_theta": m.rotary_emb_base},
    )
