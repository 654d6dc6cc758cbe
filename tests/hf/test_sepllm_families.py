"""Training-free SepLLM and SepCache streaming on the decoder families whose transformers
attention goes through AttentionInterface (tiny random models built here, no downloads):
the "sepllm" attention equals the model's own eager attention under a dense kept-set mask
written from the definition; streaming through SepCache before its first eviction equals
the full forward and full-cache generation; what cannot be exact is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from megatron.hf.sepllm_attention import apply_sepllm, check_family
from megatron.inference.hf_cache import hf_step, streaming_cache

VOCAB, SEPS, A, W = 64, [3, 5], 2, 5
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FULL_LAYERS = ["full_attention", "full_attention"]
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {"rotary_pct": 0.25}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),
    # Gemma: full-attention layers only (sliding ones are refused), query_pre_attn_scalar
    # != head_dim (a scaling the kernels take by pre-scaling the queries)
    "gemma2": (
        T.Gemma2Config,
        T.Gemma2ForCausalLM,
        {
            "layer_types": FULL_LAYERS,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "query_pre_attn_scalar": 32,
        },
    ),  # fmt: skip
    "gemma3": (
        T.Gemma3TextConfig,
        T.Gemma3ForCausalLM,
        {"layer_types": FULL_LAYERS, "query_pre_attn_scalar": 32},
    ),  # fmt: skip
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"partial_rotary_factor": 0.5}),
}


def tiny(family: str, **overrides: object) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # zero-initialised norms / biases (Qwen2's qkv) would hide mistakes
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def text(n: int, seed: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (batch, n), generator=g)
    ids[torch.rand(batch, n, generator=g) < 0.25] = SEPS[0]
    return ids


def kept_mask(ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] additive mask of the kept set, from its definition."""
    b, s = ids.shape
    keep = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        for i in range(s):
            for j in range(i + 1):
                keep[r, 0, i, j] = j < A or i - j < W or int(ids[r, j]) in SEPS
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(keep, zero, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sepllm_attention_equals_dense_mask_reference(family: str) -> None:
    model = tiny(family)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = text(24, seed=1)
    with torch.no_grad():
        want = eager(ids, attention_mask=kept_mask(ids)).logits
        full = eager(ids).logits
        apply_sepllm(model, SEPS, init_tokens=A, local_window=W)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - full).abs().max() > 1e-3  # the kept set really differs from full attention


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sepcache_before_eviction_equals_full_decode(family: str) -> None:
    model = tiny(family)
    apply_sepllm(model, SEPS, init_tokens=A, local_window=W)
    ids = text(20, seed=2)
    with torch.no_grad():
        full = model(ids).logits
    cache = streaming_cache(model, "sep", A, 4, 8, 100)  # room for all: no eviction yet
    got = torch.cat([hf_step(model, cache, ids[:, t : t + 4]) for t in range(0, 20, 4)], 1)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=0)
    prompt = ids[:1, :8]
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    fresh = streaming_cache(model, "sep", A, 4, 8, 100)
    ours = model.generate(prompt, past_key_values=fresh, **kw)
    assert ours.tolist() == model.generate(prompt, **kw).tolist()  # DynamicCache


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("mistral", {"sliding_window": 16}, "sliding-window"),
        ("gemma2", {"attn_logit_softcapping": 50.0}, "softcapping"),
        (
            "gemma3",
            {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
            "sliding-window",
        ),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type 'dynamic'",
        ),
    ],
)
def test_inexact_settings_refused_by_name(family: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_sepllm(tiny(family, **overrides), SEPS, init_tokens=A, local_window=W)


def test_two_rope_tables_refused_for_streaming() -> None:
    """Gemma 3 rotates sliding and full layers with different bases: one cache cannot
    re-rotate both (its sliding window here covers every position, so attention is exact)."""
    model = tiny("gemma3", layer_types=["sliding_attention", "full_attention"], sliding_window=64)
    apply_sepllm(model, SEPS, init_tokens=A, local_window=W)
    with pytest.raises(ValueError, match="RoPE tables"):
        streaming_cache(model, "sep", A, 4, 8, 100)


def test_unsupported_family_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        check_family(T.GPT2Config(n_layer=1, n_embd=32, n_head=4))
