"""`model.generate(ids, past_key_values=cache)` on stock transformers with our caches, after one
`apply_sepllm(model)`: equal to our own streaming loop (our GPTModel, same weights), to
full-cache generation before the first eviction, row by row under left padding, and - for a
SepLLM-trained model - the trained kept rule and the eviction together, equal to our decode."""

from __future__ import annotations

import pytest
import torch

from megatron.config.schema import SepLLMConfig
from megatron.hf.sepllm_attention import apply_sepllm
from megatron.inference.caches import StreamCache, make_policies
from megatron.inference.decode import chunks, forward_step, model_rotary
from megatron.inference.hf_cache import hf_step, streaming_cache
from megatron.model.transformer import GPTModel
from tests.inference.test_hf_stream import hf_twin
from tests.inference.test_stream_decode import LLAMA, NEOX, SEPS, A, C, S, W, build, stream_ids

NEW = 30  # new tokens: a 10-token prompt + 30 > C = 12, so the cache evicts many times


def our_greedy(model: GPTModel, prompt: torch.Tensor, kind: str, new: int = NEW) -> list[int]:
    """Our streaming loop: chunked prefill cut at the cache's room, then one token a step."""
    cache = StreamCache(make_policies(kind, 2, A, S, W, C), SEPS, True, model_rotary(model))
    for start, end in chunks(cache, prompt.shape[1], 8):
        logits = forward_step(model, cache, prompt[:, start:end])
    out = prompt[0].tolist()
    for _ in range(new):
        out.append(int(logits[0, -1].argmax()))
        logits = forward_step(model, cache, torch.tensor([[out[-1]]]))
    return out


def hf_greedy(hf: torch.nn.Module, prompt: torch.Tensor, cache: object, **kw: object) -> list:
    out = hf.generate(
        prompt, past_key_values=cache, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
        **kw,
    )  # fmt: skip
    return out.tolist()


@pytest.mark.parametrize("spec", [NEOX, LLAMA])
@pytest.mark.parametrize("kind", ["sep", "sink"])
def test_generate_equals_our_streaming_loop(spec: dict, kind: str) -> None:
    model = build(spec)
    hf = hf_twin(model)  # apply_sepllm(hf): no sepllm entry, the model's own attention
    prompt = stream_ids(10, seed=11)[None]
    cache = streaming_cache(hf, kind, A, S, W, C, separator_ids=SEPS)
    got = hf_greedy(hf, prompt, cache)[0]
    assert got == our_greedy(model, prompt, kind)
    assert max(cache.stream.summary()["peak_length"]) <= C  # it evicted, and stayed bounded
    assert cache.stream.summary()["tokens"] == 10 + NEW - 1


def test_generate_continues_after_a_chunked_prefill() -> None:
    """A prompt streamed through the cache in chunks (cut at its room, evicting), then
    `generate` with the whole prompt: it feeds only the ids after the tokens processed."""
    model = build(LLAMA)
    hf = hf_twin(model)
    prompt = stream_ids(25, seed=15)[None]
    cache = streaming_cache(hf, "sep", A, S, W, C, separator_ids=SEPS)
    for start, end in chunks(cache.stream, 24, 8):
        hf_step(hf, cache, prompt[:, start:end])
    assert max(cache.stream.summary()["peak_length"]) <= C < 24  # it evicted already
    assert hf_greedy(hf, prompt, cache)[0] == our_greedy(model, prompt, "sep")


def test_generate_equals_full_cache_before_eviction() -> None:
    hf = hf_twin(build(LLAMA))
    prompt = stream_ids(10, seed=12)[None]
    roomy = streaming_cache(hf, "sep", A, S, W, 100, separator_ids=SEPS)  # never evicts here
    assert hf_greedy(hf, prompt, roomy) == hf_greedy(hf, prompt, None)  # DynamicCache


def test_batched_left_padding_equals_single_rows() -> None:
    hf = hf_twin(build(LLAMA))
    a, b = stream_ids(10, seed=13), stream_ids(6, seed=14)
    pad = 0
    batch = torch.stack([a, torch.cat([torch.full((4,), pad), b])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    cache = streaming_cache(hf, "sep", A, S, W, C, separator_ids=SEPS)
    got = hf_greedy(hf, batch, cache, attention_mask=mask, pad_token_id=pad)
    for row, ids, skip in ((0, a, 0), (1, b, 4)):
        single = streaming_cache(hf, "sep", A, S, W, C, separator_ids=SEPS)
        assert got[row][skip:] == hf_greedy(hf, ids[None], single, pad_token_id=pad)[0]


def trained() -> tuple[GPTModel, torch.nn.Module]:
    """Our SepLLM-trained model and its transformers twin with the export's sepllm entry."""
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=SEPS, init_tokens=1, local_window=5)
    model = build(LLAMA, sep)
    hf = hf_twin(model)
    hf.config.sepllm = {
        "mode": "sepllm", "separator_token_ids": SEPS, "init_tokens": 1, "local_window": 5,
        "seq_length": model.cfg.seq_length,
    }  # fmt: skip
    apply_sepllm(hf)  # the entry's kept rule, as after from_pretrained of an export
    return model, hf


@pytest.mark.parametrize("kind", ["sep", "sink"])
def test_trained_kept_rule_and_eviction_together(kind: str) -> None:
    model, hf = trained()
    ids = stream_ids(40)[None]
    ours = StreamCache(make_policies(kind, 2, A, S, W, C), SEPS, True, model_rotary(model))
    want = torch.cat([forward_step(model, ours, ids[:, t : t + 1]) for t in range(40)], 1)
    cache = streaming_cache(hf, kind, A, S, W, C)  # separators: the sepllm entry's
    got = torch.cat([hf_step(hf, cache, ids[:, t : t + 1]) for t in range(40)], 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the kept rule really acts over the held keys: attending all of them differs
    plain = hf_twin(build(LLAMA, model.sep))
    every = streaming_cache(plain, kind, A, S, W, C, separator_ids=SEPS)
    other = torch.cat([hf_step(plain, every, ids[:, t : t + 1]) for t in range(40)], 1)
    assert (other - want).abs().max() > 1e-2
    prompt = ids[:, :10]
    gen = streaming_cache(hf, kind, A, S, W, C)
    assert hf_greedy(hf, prompt, gen)[0] == our_greedy(model, prompt, kind)


def test_cache_separators_must_be_the_models() -> None:
    _, hf = trained()
    cache = streaming_cache(hf, "sep", A, S, W, C, separator_ids=[3])
    with pytest.raises(ValueError, match="separator_ids"):
        hf_step(hf, cache, stream_ids(4)[None])


def test_no_process_wide_hook_and_remove() -> None:
    before = dict(torch.nn.modules.module._global_forward_pre_hooks)
    _, hf = trained()
    assert dict(torch.nn.modules.module._global_forward_pre_hooks) == before
    hf._sepllm.remove()
    with pytest.raises(RuntimeError, match="apply_sepllm"):
        hf(stream_ids(4)[None])
