"""Our model vs tiny random transformers models with the same weights (independent reference)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.hf.adapters import from_hf, hf_config, to_hf
from megatron.model.transformer import GPTModel

VOCAB = 96

NEOX = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    seq_length=24,
    rotary_pct=0.25,
    gpt_j_residual=True,
    activation="gelu",
    norm="layernorm",
    no_weight_tying=True,
)
NEOX_SEQUENTIAL = {**NEOX, "gpt_j_residual": False, "rotary_pct": 1.0}
LLAMA = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_heads=2,
    seq_length=24,
    activation="swiglu",
    norm="rmsnorm",
    use_bias_in_attn_linear=False,
    use_bias_in_mlp=False,
    no_weight_tying=True,
    rotary_emb_base=500000.0,
    layernorm_epsilon=1e-6,
)
LLAMA_TIED = {**LLAMA, "no_weight_tying": False}


@pytest.mark.parametrize("spec", [NEOX, NEOX_SEQUENTIAL, LLAMA, LLAMA_TIED])
def test_logits_match_transformers(spec: dict) -> None:
    torch.manual_seed(0)
    m = ModelConfig(**spec)
    ours = GPTModel(m, SepLLMConfig(), VOCAB).eval()
    cls = LlamaForCausalLM if m.norm == "rmsnorm" else GPTNeoXForCausalLM
    theirs = cls(hf_config(m, VOCAB)).eval()
    missing, unexpected = theirs.load_state_dict(to_hf(ours.state_dict(), m), strict=False)
    assert not unexpected
    assert not missing
    ids = torch.randint(0, VOCAB, (2, m.seq_length))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", [NEOX, LLAMA])
def test_round_trip_state_dict(spec: dict) -> None:
    m = ModelConfig(**spec)
    ours = GPTModel(m, SepLLMConfig(), VOCAB)
    state = ours.state_dict()
    back = from_hf(to_hf(state, m), m)
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k])
