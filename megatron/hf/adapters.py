"""State-dict adapters between our GPTModel and transformers' GPTNeoX / Llama models.

One explicit key map per family, used by both directions. Our fused qkv is laid out
[q (H*D) | k (Hkv*D) | v (Hkv*D)] (the parts its layer declares); GPT-NeoX's is per head
[H, (q, k, v), D]. Both directions are strict: every key of the source is consumed, or the
conversion raises naming the keys left over (or the ones missing).
"""

from __future__ import annotations

import torch

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.hf.configs import UnmappedOption, check_exportable, family, hf_config
from megatron.model.transformer import GPTModel
from megatron.parallel.layers import Layout, param_layouts

Tensor = torch.Tensor
EMBED, HEAD = "embedding.embed.weight", "output.head.weight"
# transformers 5 names the GPT-NeoX head lm_head too (older checkpoints: embed_out).
HF_HEADS = ("lm_head.weight", "embed_out.weight")
# Buffers older transformers versions saved with the weights (causal masks, rotary
# frequencies): recomputed by both models, so dropped on import.
HF_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


__all__ = ["family", "from_hf", "hf_config", "to_hf"]


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
        p + "attn.dense.bias": h + "self_attn.o_proj.bias",
        p + "mlp.gate.weight": h + "mlp.gate_proj.weight",
        p + "mlp.gate.bias": h + "mlp.gate_proj.bias",
        p + "mlp.up.weight": h + "mlp.up_proj.weight",
        p + "mlp.up.bias": h + "mlp.up_proj.bias",
        p + "mlp.down.weight": h + "mlp.down_proj.weight",
        p + "mlp.down.bias": h + "mlp.down_proj.bias",
    }


def _key_map(m: ModelConfig) -> dict[str, str]:
    """Our name -> theirs for every one-to-one tensor (all but qkv and the head); entries
    for parameters a config lacks (biases) are skipped."""
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


def _layouts(m: ModelConfig, vocab_size: int) -> dict[str, Layout]:
    """Every parameter of our model for this config -> its layer's layout (built on meta)."""
    with torch.device("meta"):
        return param_layouts(GPTModel(m, SepLLMConfig(), vocab_size))


def _qkv(i: int, kind: str) -> str:
    return f"blocks.{i}.attn.qkv.{kind}"


def _neox_qkv(i: int, kind: str) -> str:
    return f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"


def _llama_qkv(i: int, kind: str) -> list[str]:
    return [f"model.layers.{i}.self_attn.{n}_proj.{kind}" for n in "qkv"]


def _check_neox_heads(m: ModelConfig) -> None:
    if m.kv_heads != m.num_attention_heads:
        raise UnmappedOption(
            f"GPT-NeoX has no grouped-query attention (num_kv_heads {m.kv_heads} != "
            f"num_attention_heads {m.num_attention_heads})"
        )


def _strict(what: str, source: dict[str, Tensor], consumed: set[str]) -> None:
    left = [k for k in source if k not in consumed]
    if left:
        raise KeyError(f"{what}: keys with no mapping: {', '.join(left)}")


def _take(source: dict[str, Tensor], key: str, consumed: set[str], what: str) -> Tensor:
    if key not in source:
        raise KeyError(f"{what}: missing key {key}")
    consumed.add(key)
    return source[key]


def to_hf(state: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """Our state dict -> transformers state dict (GPTNeoXForCausalLM or LlamaForCausalLM)."""
    what = "to_hf"
    fam, consumed, out = family(m), set(), {}
    layouts = _layouts(m, _take(state, EMBED, set(), what).shape[0])
    for ours, theirs in _key_map(m).items():
        if ours in layouts:  # e.g. norms without bias have no bias key
            out[theirs] = _take(state, ours, consumed, what)
    h, d = m.num_attention_heads, m.head_dim
    if fam == "neox":
        _check_neox_heads(m)
    for i in range(m.num_layers):
        for kind in ("weight", "bias"):
            if _qkv(i, kind) not in layouts:
                continue
            w = _take(state, _qkv(i, kind), consumed, what)
            q, k, v = layouts[_qkv(i, kind)].split_parts(w)
            if fam == "neox":  # [3, H, D, ...] -> [H, 3, D, ...]
                fused = torch.stack([t.reshape(h, d, *t.shape[1:]) for t in (q, k, v)], 1)
                out[_neox_qkv(i, kind)] = fused.reshape(w.shape)
            else:
                for name, t in zip(_llama_qkv(i, kind), (q, k, v)):
                    out[name] = t
    head = _take(state, HEAD, consumed, what) if m.no_weight_tying else state[EMBED]
    out["lm_head.weight"] = head
    _strict(what, state, consumed)
    check_exportable(m)  # keys can match while the architecture differs (rmsnorm + gelu)
    return {k: v.clone() for k, v in out.items()}


def from_hf(hf_state: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """transformers state dict -> ours (the inverse of to_hf)."""
    what = "from_hf"
    fam, out = family(m), {}
    consumed = {k for k in hf_state if k.endswith(HF_BUFFERS)}
    embed = _key_map(m)[EMBED]
    layouts = _layouts(m, _take(hf_state, embed, set(), what).shape[0])
    for ours, theirs in _key_map(m).items():
        if ours in layouts:
            out[ours] = _take(hf_state, theirs, consumed, what)
    h, d = m.num_attention_heads, m.head_dim
    if fam == "neox":
        _check_neox_heads(m)
    for i in range(m.num_layers):
        for kind in ("weight", "bias"):
            if _qkv(i, kind) not in layouts:
                continue
            layout = layouts[_qkv(i, kind)]
            if fam == "neox":
                w = _take(hf_state, _neox_qkv(i, kind), consumed, what)
                per_head = w.reshape(h, 3, d, *w.shape[1:])
                out[_qkv(i, kind)] = per_head.transpose(0, 1).reshape(w.shape)
            else:
                parts = [_take(hf_state, n, consumed, what) for n in _llama_qkv(i, kind)]
                out[_qkv(i, kind)] = torch.cat(parts, layout.dim)
            layout.split_parts(out[_qkv(i, kind)])  # checks the parts' sizes
    heads = [k for k in HF_HEADS if k in hf_state]
    if m.no_weight_tying:
        if not heads:
            raise KeyError(f"{what}: missing key {HF_HEADS[0]} (the untied output head)")
        out[HEAD] = hf_state[heads[0]]
    consumed.update(heads)  # with tied weights the head is the embedding
    _strict(what, hf_state, consumed)
    check_exportable(m)
    return {k: v.clone() for k, v in out.items()}
