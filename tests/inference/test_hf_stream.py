"""transformers GPTNeoX / Llama streaming through our Cache layers vs the independent
never-evicting reference (run on our model with the same weights); `apply_sepllm` hands the
cache its ids."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

from megatron.hf.adapters import family, hf_config, to_hf
from megatron.hf.sepllm_attention import apply_sepllm
from megatron.inference.caches import StreamCache, make_policies
from megatron.inference.hf_cache import StreamingCache, hf_rotary, hf_step
from tests.inference.reference import reference_decode, simulate_policy
from tests.inference.test_stream_decode import (
    LLAMA,
    NEOX,
    SEPS,
    VOCAB,
    A,
    C,
    S,
    W,
    build,
    stream_ids,
)


def hf_twin(model: torch.nn.Module) -> torch.nn.Module:
    m = model.cfg
    cls = LlamaForCausalLM if family(m) == "llama" else GPTNeoXForCausalLM
    hf = cls(hf_config(m, VOCAB)).eval()
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), m), strict=False)
    assert not unexpected and not missing
    apply_sepllm(hf)  # no sepllm entry: the model's own attention, the cache's ids routed
    return hf


def new_hf_cache(hf: torch.nn.Module, kind: str, shift: bool, layers: int = 2) -> StreamingCache:
    return StreamingCache(
        StreamCache(make_policies(kind, layers, A, S, W, C), SEPS, shift, hf_rotary(hf))
    )


@pytest.mark.parametrize("spec", [NEOX, LLAMA])
@pytest.mark.parametrize("kind", ["sep", "sink"])
@pytest.mark.parametrize("shift", [True, False])
def test_hf_eviction_matches_reference(spec: dict, kind: str, shift: bool) -> None:
    model = build(spec)
    hf = hf_twin(model)
    ids = stream_ids(40)
    cache = new_hf_cache(hf, kind, shift)
    got = torch.cat([hf_step(hf, cache, ids[None, t : t + 1]) for t in range(len(ids))], 1)[0]
    held = simulate_policy(ids.tolist(), kind, A, S, W, C, set(SEPS))
    expected = reference_decode(model, ids.tolist(), held, shift)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert max(cache.stream.summary()["peak_length"]) <= C


def test_hf_before_eviction_matches_full_forward() -> None:
    hf = hf_twin(build(LLAMA))
    ids = stream_ids(C)[None]
    with torch.no_grad():
        full = hf(ids).logits
    cache = new_hf_cache(hf, "sep", True)
    got = torch.cat([hf_step(hf, cache, ids[:, t : t + 5]) for t in range(0, C, 5)], 1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_hf_needs_the_ids_and_uniform_sizes() -> None:
    hf = hf_twin(build(NEOX))
    cache = new_hf_cache(hf, "sep", True)
    hf._sepllm.remove()  # a model without apply_sepllm never hands the cache its ids
    with pytest.raises(RuntimeError, match="apply_sepllm"):
        hf(torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)
    mixed = StreamCache(make_policies("sep", 2, A, S, W, [C, C + 1]), SEPS, True, hf_rotary(hf))
    with pytest.raises(ValueError, match="same cache sizes"):
        StreamingCache(mixed)


def test_hf_left_padded_rows_equal_single_rows() -> None:
    hf = hf_twin(build(LLAMA))
    a, b = stream_ids(30, seed=7), stream_ids(26, seed=8)
    batch = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    cache = new_hf_cache(hf, "sep", True)
    first = hf_step(hf, cache, batch[:, :10], mask[:, :10])
    rest = [hf_step(hf, cache, batch[:, t : t + 1]) for t in range(10, 30)]
    got = torch.cat([first, *rest], 1)
    for row, ids, pad in ((0, a, 0), (1, b, 4)):
        single = new_hf_cache(hf, "sep", True)
        ref = [hf_step(hf, single, ids[None, : 10 - pad])]
        ref += [hf_step(hf, single, ids[None, t : t + 1]) for t in range(10 - pad, len(ids))]
        torch.testing.assert_close(got[row, pad:], torch.cat(ref, 1)[0], atol=1e-4, rtol=0)
