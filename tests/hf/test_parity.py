"""Logits parity against transformers' own forward, both config directions, and refusals.

Independent reference: transformers' GPTNeoXForCausalLM / LlamaForCausalLM built from the
config we produce (ours -> HF) or from a config written the way a user would (HF -> ours).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    GPT2Config,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.hf.adapters import from_hf, hf_config, to_hf
from megatron.hf.configs import UnmappedOption, config_from_hf
from megatron.model.transformer import GPTModel

VOCAB = 96
BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=24)
NEOX = dict(BASE, activation="gelu", norm="layernorm", rotary_pct=0.25)
LLAMA = dict(
    BASE,
    activation="swiglu",
    norm="rmsnorm",
    use_bias_in_attn_linear=False,
    use_bias_in_mlp=False,
    layernorm_epsilon=1e-6,
)
SPECS = {
    "neox_pct025_parallel_untied": dict(NEOX, gpt_j_residual=True, no_weight_tying=True),
    "neox_pct1_sequential_tied": dict(NEOX, rotary_pct=1.0, gpt_j_residual=False),
    "neox_pct025_sequential_untied_base": dict(NEOX, no_weight_tying=True, rotary_emb_base=500.0),
    "neox_pct1_parallel_tied_nobias_attn": dict(
        NEOX, rotary_pct=1.0, gpt_j_residual=True, use_bias_in_attn_linear=False
    ),
    "llama_gqa_untied_base": dict(LLAMA, num_kv_heads=2, no_weight_tying=True, rotary_emb_base=5e5),
    "llama_mqa_tied": dict(LLAMA, num_kv_heads=1),
    "llama_mha_untied": dict(LLAMA, no_weight_tying=True),
    "llama_attention_bias": dict(LLAMA, num_kv_heads=2, use_bias_in_attn_linear=True),
    "llama_mlp_bias": dict(LLAMA, use_bias_in_mlp=True, no_weight_tying=True),
}


def _cls(m: ModelConfig) -> type:
    return LlamaForCausalLM if m.norm == "rmsnorm" else GPTNeoXForCausalLM


def _perturb(model: torch.nn.Module) -> None:
    """Random norms and biases: at their init (ones / zeros) a dropped bias would not show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln" in name:
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_ours_to_transformers_logits(name: str) -> None:
    torch.manual_seed(0)
    m = ModelConfig(**SPECS[name])
    ours = GPTModel(m, SepLLMConfig(), VOCAB).eval()
    _perturb(ours)
    theirs = _cls(m)(hf_config(m, VOCAB)).eval()
    theirs.load_state_dict(to_hf(ours.state_dict(), m), strict=True)
    ids = torch.randint(0, VOCAB, (2, m.seq_length))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


HF_CONFIGS = {
    "neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=32,
        layer_norm_eps=1e-6,
        use_parallel_residual=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1234.0,
            "partial_rotary_factor": 0.5,
        },
        tie_word_embeddings=True,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=80,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 77.0},
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_transformers_config_to_ours_logits(kind: str) -> None:
    """A user's transformers model -> config_from_hf + from_hf -> the same logits."""
    torch.manual_seed(1)
    theirs = _cls_for(kind)(HF_CONFIGS[kind]()).eval()
    _perturb(theirs)
    m = config_from_hf(theirs.config)
    ours = GPTModel(m, SepLLMConfig(), VOCAB).eval()
    ours.load_state_dict(from_hf(theirs.state_dict(), m), strict=True)
    ids = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    # and back: the same transformers config values
    again = hf_config(m, VOCAB).to_dict()
    for key, value in theirs.config.to_dict().items():
        if key in ("rope_parameters", "num_key_value_heads", "head_dim", "rms_norm_eps"):
            assert again[key] == value, key


def _cls_for(kind: str) -> type:
    return GPTNeoXForCausalLM if kind == "neox" else LlamaForCausalLM


@pytest.mark.parametrize("name", sorted(SPECS))
def test_round_trips_give_identical_tensors(name: str) -> None:
    torch.manual_seed(2)
    m = ModelConfig(**SPECS[name])
    state = GPTModel(m, SepLLMConfig(), VOCAB).state_dict()
    back = from_hf(to_hf(state, m), m)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    hf = _cls(m)(hf_config(m, VOCAB)).state_dict()
    if not m.no_weight_tying:
        hf.pop("lm_head.weight", None)
    again = to_hf(from_hf(hf, m), m)
    for k, v in hf.items():
        assert torch.equal(again[k], v), k
    assert dataclasses.asdict(config_from_hf(hf_config(m, VOCAB))) == dataclasses.asdict(
        dataclasses.replace(
            m,
            intermediate_size=m.ffn_size,
            max_position_embeddings=m.max_positions,
            num_kv_heads=m.kv_heads if m.norm == "rmsnorm" else None,
            make_vocab_size_divisible_by=1,
            use_bias_in_norms=m.use_bias_in_norms or m.norm == "rmsnorm",
        )
    )


REFUSED = {
    "pos_emb: learned": dict(NEOX, pos_emb="learned"),
    "pos_emb: none": dict(NEOX, pos_emb="none"),
    "norm: rmsnorm with activation: gelu": dict(NEOX, norm="rmsnorm"),
    "norm: layernorm with activation: swiglu": dict(NEOX, activation="swiglu"),
    "rotary_pct: 0.5": dict(LLAMA, rotary_pct=0.5),
    "num_kv_heads: 2": dict(NEOX, num_kv_heads=2),
    "use_bias_in_mlp: false": dict(NEOX, use_bias_in_mlp=False),
    "use_bias_in_norms: false": dict(NEOX, use_bias_in_norms=False),
    "gpt_j_residual: true": dict(LLAMA, gpt_j_residual=True),
}


@pytest.mark.parametrize("message", sorted(REFUSED))
def test_configs_transformers_cannot_express_are_refused_by_name(message: str) -> None:
    m = ModelConfig(**REFUSED[message])
    with pytest.raises(UnmappedOption, match=message):
        hf_config(m, VOCAB)
    state = GPTModel(m, SepLLMConfig(), VOCAB).state_dict()
    with pytest.raises((UnmappedOption, KeyError)):
        to_hf(state, m)


def test_transformers_options_we_do_not_map_are_refused_by_name() -> None:
    c = HF_CONFIGS["llama"]()
    c.rope_parameters = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(UnmappedOption, match="rope_type: linear"):
        config_from_hf(c)
    c = HF_CONFIGS["neox"]()
    c.hidden_act = "gelu_new"
    with pytest.raises(UnmappedOption, match="hidden_act: gelu_new"):
        config_from_hf(c)
    c = HF_CONFIGS["llama"]()
    c.head_dim = 32
    with pytest.raises(UnmappedOption, match="head_dim: 32"):
        config_from_hf(c)
    with pytest.raises(UnmappedOption, match="model_type: gpt2"):
        config_from_hf(GPT2Config())
