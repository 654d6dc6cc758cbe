"""Our GPTModel decoding over the streaming caches vs independent references."""

from __future__ import annotations

import pytest
import torch

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.inference.caches import StreamCache, make_policies
from megatron.inference.decode import chunks, forward_step, model_rotary
from megatron.model.transformer import GPTModel
from tests.inference.reference import nll, reference_decode, simulate_policy

VOCAB = 48
SEPS = [3, 5, 7]
NEOX = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    seq_length=64,
    rotary_pct=0.25,
    gpt_j_residual=True,
    no_weight_tying=True,
)
LLAMA = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    seq_length=64,
    activation="swiglu",
    norm="rmsnorm",
    use_bias_in_attn_linear=False,
    use_bias_in_mlp=False,
)
A, S, W, C = 2, 3, 4, 12  # small, so a 60-token stream compresses many times


def build(spec: dict, sep: SepLLMConfig | None = None) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(ModelConfig(**spec), sep or SepLLMConfig(), VOCAB).eval()


def stream_ids(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n,), generator=g)
    ids[torch.rand(n, generator=g) < 0.25] = SEPS[0]  # plenty of separators
    return ids


def new_cache(model: GPTModel, kind: str, shift: bool, grow: bool = False) -> StreamCache:
    policies = make_policies(kind, model.cfg.num_layers, A, S, W, C, grow=grow)
    return StreamCache(policies, SEPS, shift, model_rotary(model))


def token_by_token(model: GPTModel, cache: StreamCache, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([forward_step(model, cache, ids[None, t : t + 1]) for t in range(len(ids))], 1)


@pytest.mark.parametrize("spec", [NEOX, LLAMA])
@pytest.mark.parametrize("chunk", [1, 5])
def test_before_eviction_matches_full_forward(spec: dict, chunk: int) -> None:
    model = build(spec)
    ids = stream_ids(40)[None].repeat(2, 1)
    with torch.no_grad():
        full = model(ids)
    cache = StreamCache(make_policies("sep", 2, 4, 8, 16, 100), SEPS, True, model_rotary(model))
    got = torch.cat(
        [forward_step(model, cache, ids[:, i : i + chunk]) for i in range(0, 40, chunk)], 1
    )
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", [NEOX, LLAMA])
@pytest.mark.parametrize("kind", ["sep", "sink", "sep_grow"])
@pytest.mark.parametrize("shift", [True, False])
def test_eviction_matches_reference(spec: dict, kind: str, shift: bool) -> None:
    model = build(spec)
    ids = stream_ids(40)
    held = simulate_policy(ids.tolist(), kind, A, S, W, C, set(SEPS))
    cache = new_cache(model, kind.split("_")[0], shift, grow=kind == "sep_grow")
    got = token_by_token(model, cache, ids)[0]
    expected = reference_decode(model, ids.tolist(), held, shift)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The cache holds exactly what the policy holds after the last compression.
    final = simulate_policy(ids.tolist() + [0], kind, A, S, W, C, set(SEPS))[-1][:-1]
    for layer in cache.layers:
        assert layer.text_pos[0][layer.valid[0]].tolist() == final


def test_sepllm_model_kept_rule_over_cache() -> None:
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=SEPS, init_tokens=1, local_window=5)
    model = build(NEOX, sep)
    ids = stream_ids(50)
    for shift in (True, False):
        held = simulate_policy(ids.tolist(), "sep", A, S, W, C, set(SEPS))
        got = token_by_token(model, new_cache(model, "sep", shift), ids)[0]
        torch.testing.assert_close(
            got, reference_decode(model, ids.tolist(), held, shift), atol=1e-4, rtol=0
        )


def test_capacity_and_held_separators() -> None:
    model = build(NEOX)
    ids = stream_ids(80, seed=3)
    cache = new_cache(model, "sep", True)
    compressions = 0
    for t in range(len(ids)):
        before = int(cache.layer(0).row_lengths().max()) if t else 0
        forward_step(model, cache, ids[None, t : t + 1])
        layer = cache.layer(0)
        now = int(layer.row_lengths().max())
        assert now <= C
        if now < before + 1:  # compressed at step t: held = initial | separators | window
            compressions += 1
            block = layer.text_pos[0][layer.valid[0]].tolist()[A : now - W]
            # exactly the newest S separators that left the window, counted independently
            evicted = [j for j in range(A, t + 1 - W) if int(ids[j]) in SEPS]
            assert block == evicted[-S:]
    assert compressions >= 5
    stats = cache.summary()
    assert max(stats["peak_length"]) <= C and stats["tokens"] == 80
    assert max(stats["peak_attended"]) == C + 1
    assert 0 < stats["kept_kv_ratio"] < 1


@pytest.mark.parametrize("kind", ["sep", "sink"])
def test_chunks_equal_token_by_token(kind: str) -> None:
    model = build(LLAMA)
    ids = stream_ids(70, seed=5)
    one = token_by_token(model, new_cache(model, kind, True), ids)[0]
    cache = new_cache(model, kind, True)
    parts = []
    for start, end in chunks(cache, len(ids), 8):
        parts.append(forward_step(model, cache, ids[None, start:end])[0])
        assert int(cache.layer(0).row_lengths().max()) <= C
    chunked = torch.cat(parts)
    torch.testing.assert_close(nll(chunked, ids), nll(one, ids), atol=1e-4, rtol=0)


def test_left_padded_rows_equal_single_rows() -> None:
    model = build(LLAMA)
    a, b = stream_ids(30, seed=7), stream_ids(26, seed=8)
    batch = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    cache = new_cache(model, "sep", True)
    first = forward_step(model, cache, batch[:, :10], mask[:, :10])
    rest = [forward_step(model, cache, batch[:, t : t + 1]) for t in range(10, 30)]
    got = torch.cat([first, *rest], 1)
    for row, ids, pad in ((0, a, 0), (1, b, 4)):
        single = new_cache(model, "sep", True)
        ref = [forward_step(model, single, ids[None, : 10 - pad])] if pad < 10 else []
        ref += [
            forward_step(model, single, ids[None, t : t + 1]) for t in range(10 - pad, len(ids))
        ]
        torch.testing.assert_close(got[row, pad:], torch.cat(ref, 1)[0], atol=1e-4, rtol=0)


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="< cache_size"):
        make_policies("sep", 2, 4, 32, 256, 292)


def test_long_prefill_holds_at_most_c_plus_one_chunk() -> None:
    model = build(LLAMA)
    ids = stream_ids(600, seed=9)
    cache = new_cache(model, "sep", True)
    for start, end in chunks(cache, len(ids), 16, exact=False):
        forward_step(model, cache, ids[None, start:end])
        assert int(cache.layer(0).row_lengths().max()) <= C
    stats = cache.summary()
    assert max(stats["peak_attended"]) <= C + 16 and stats["tokens"] == 600


def test_per_layer_sizes() -> None:
    model = build(NEOX)
    ids = stream_ids(40, seed=4)
    policies = make_policies("sep", 2, A, [S, S + 2], W, [C, C + 4])
    cache = StreamCache(policies, SEPS, True, model_rotary(model))
    token_by_token(model, cache, ids)
    peaks = cache.summary()["peak_length"]
    assert peaks == [C, C + 4]
    for layer, (s, c) in zip(cache.layers, [(S, C), (S + 2, C + 4)], strict=True):
        held = simulate_policy(ids.tolist() + [0], "sep", A, s, W, c, set(SEPS))[-1][:-1]
        assert layer.text_pos[0][layer.valid[0]].tolist() == held
