"""Qwen2 (Llama + q/k/v biases) and Mistral (without sliding window) both ways: a tiny random
transformers model -> our GPTModel gives its logits, back to transformers gives its tensors;
a Qwen2 fine-tuned with SepLLM attention exports back to a Qwen2 that runs the same kept rule;
what our model cannot express is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from megatron.config.schema import SepLLMConfig
from megatron.hf.adapters import from_hf, to_hf
from megatron.hf.configs import UnmappedOption, config_from_hf, hf_config
from megatron.hf.sepllm_attention import apply_sepllm
from megatron.inference.caches import StreamCache, make_policies
from megatron.inference.decode import forward_step, model_rotary
from megatron.inference.hf_cache import hf_step, streaming_cache
from megatron.model.transformer import GPTModel
from tests.inference.reference import reference_decode, simulate_policy

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip
FAMILIES = {
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),
}


def tiny(family: str, **overrides: object) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():  # zero biases / unit norms would hide a dropped or swapped tensor
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_both_ways(family: str) -> None:
    theirs = tiny(family)
    m = config_from_hf(theirs.config)
    ours = GPTModel(m, SepLLMConfig(), VOCAB).eval()
    ours.load_state_dict(from_hf(theirs.state_dict(), m), strict=True)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-4, rtol=0)
    back = to_hf(ours.state_dict(), m)
    want = {k: v for k, v in theirs.state_dict().items() if not k.endswith("inv_freq")}
    assert back.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(back[key], value), key
    # Qwen2 exports as Qwen2; Mistral without sliding window is a Llama
    expected = "qwen2" if family == "qwen2" else "llama"
    assert hf_config(m, VOCAB).model_type == expected


def test_qwen2_fine_tuned_with_sepllm_exports_its_kept_rule() -> None:
    seps = [5, 7]
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=seps, init_tokens=2, local_window=5)
    theirs = tiny("qwen2")
    m = config_from_hf(theirs.config)
    ours = GPTModel(m, sep, VOCAB).eval()  # as after fine-tuning with SepLLM attention
    ours.load_state_dict(from_hf(theirs.state_dict(), m))
    exported = T.Qwen2ForCausalLM(hf_config(m, VOCAB)).eval()
    exported.load_state_dict(to_hf(ours.state_dict(), m))
    apply_sepllm(exported, seps, init_tokens=2, local_window=5)
    x = ids()
    x[:, ::3] = seps[0]
    with torch.no_grad():
        got, want = exported(x).logits, ours(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (got - theirs(x).logits).abs().max() > 1e-3  # the kept rule acts


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["sep", "sink"])
def test_streaming_with_eviction_equals_reference(family: str, kind: str) -> None:
    """The converted twin gives these families the independent eviction reference of
    tests/inference/reference.py (raw keys re-rotated afresh at every step)."""
    a, s, w, c = 2, 3, 4, 12
    theirs = tiny(family)
    m = config_from_hf(theirs.config)
    ours = GPTModel(m, SepLLMConfig(), VOCAB).eval()
    ours.load_state_dict(from_hf(theirs.state_dict(), m))
    apply_sepllm(theirs)  # the model's own attention; the hooks hand the cache its ids
    x = ids()[0, :]
    x = torch.cat([x, x.flip(0)])  # 48 tokens
    x[::4] = 5
    cache = streaming_cache(theirs, kind, a, s, w, c, separator_ids=[5])
    got = torch.cat([hf_step(theirs, cache, x[None, t : t + 1]) for t in range(len(x))], 1)[0]
    held = simulate_policy(x.tolist(), kind, a, s, w, c, {5})
    torch.testing.assert_close(
        got, reference_decode(ours, x.tolist(), held, True), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sepllm_rule_with_eviction_equals_our_decode(family: str) -> None:
    """Training-free SepLLM on the transformers model and on its converted twin, each
    streaming through a SepCache that evicts: the same logits step by step."""
    seps = [5]
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=seps, init_tokens=2, local_window=5)
    theirs = tiny(family)
    m = config_from_hf(theirs.config)
    ours = GPTModel(m, sep, VOCAB).eval()
    ours.load_state_dict(from_hf(theirs.state_dict(), m))
    apply_sepllm(theirs, seps, init_tokens=2, local_window=5)
    x = ids()
    x[:, ::4] = 5
    policies = make_policies("sep", m.num_layers, 2, 3, 6, 12)
    mine = StreamCache(policies, seps, True, model_rotary(ours))
    want = torch.cat([forward_step(ours, mine, x[:, t : t + 1]) for t in range(24)], 1)
    cache = streaming_cache(theirs, "sep", 2, 3, 6, 12)  # separators: the sepllm entry's
    got = torch.cat([hf_step(theirs, cache, x[:, t : t + 1]) for t in range(24)], 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert max(cache.stream.summary()["peak_length"]) <= 12 < 24


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("mistral", {"sliding_window": 16}, "sliding_window: 16"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ],
)
def test_sliding_window_refused(family: str, overrides: dict, message: str) -> None:
    with pytest.raises(UnmappedOption, match=message):
        config_from_hf(tiny(family, **overrides).config)


def test_other_families_refused_by_name() -> None:
    config = T.Gemma2Config(**COMMON)
    with pytest.raises(UnmappedOption, match="model_type: gemma2"):
        config_from_hf(config)
