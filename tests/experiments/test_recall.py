"""The long-range recall data (megatron/data/recall.py): deterministic by seed, answerable
with the whole sequence, unanswerable from the initial tokens + the last L * (w - 1) tokens
for far queries, and SepLLM's kept set holds each fact's separator (docs/results.md,
"Long-range recall"). The trained-model ordering is a benchmark printout
(tools/experiments/run_recall.py), not a test."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.recall import (
    CLOSE,
    HEADER,
    KEY0,
    SEP,
    VALUE0,
    RecallSpec,
    generate_many,
    write_dataset,
)
from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.info import build_kept_set, dense_keep_mask

W, LAYERS, A, S = 16, 4, 4, 256  # window, layers, sinks, sequence: the benchmark's sizes
REACH = LAYERS * (W - 1)  # how far back an L-layer initial + window model can see


def lookup(tokens: np.ndarray, visible: np.ndarray, pos: int) -> int | None:
    """Independent reference predictor: the token after the latest earlier fact
    `KEY VALUE` whose key is tokens[pos], among the `visible` positions only."""
    key = tokens[pos]
    for j in range(pos - 1, -1, -1):
        if visible[j] and visible[min(j + 1, pos)] and tokens[j] == key and j + 1 < pos:
            if VALUE0 <= tokens[j + 1] < KEY0:
                return int(tokens[j + 1])
    return None


@pytest.fixture(scope="module")
def seqs() -> list:
    return generate_many(RecallSpec(), 24, S, seed=11)


def test_deterministic_by_seed() -> None:
    a, b = generate_many(RecallSpec(), 3, S, 5), generate_many(RecallSpec(), 3, S, 5)
    assert all(np.array_equal(x.tokens, y.tokens) and x.queries == y.queries for x, y in zip(a, b))
    c = generate_many(RecallSpec(), 3, S, 6)
    assert not np.array_equal(a[0].tokens, c[0].tokens)
    nosep = generate_many(RecallSpec(separators=False), 3, S, 5)
    for x, y in zip(a, nosep):  # the ablation: the same sequences, SEP -> CLOSE
        assert np.array_equal(np.where(x.tokens == SEP, CLOSE, x.tokens), y.tokens)
        assert not (y.tokens == SEP).any()


def test_full_context_answers_and_window_cannot(seqs: list) -> None:
    far = 0
    for s in seqs:
        t = s.tokens
        assert len(t) == S and (t[:A] == HEADER).all()
        everything = np.ones(S, bool)
        for q in s.queries:
            assert t[q.fact_pos] == q.key == t[q.answer_pos] and t[q.fact_pos + 1] == q.value
            assert t[q.fact_sep_pos] == SEP and q.fact_sep_pos == q.fact_pos + 2
            assert lookup(t, everything, q.answer_pos) == q.value  # full attention can answer
            seen = np.zeros(S, bool)
            seen[:A] = True  # the sinks: constant HEADER tokens
            seen[max(0, q.answer_pos - REACH) : q.answer_pos + 1] = True
            if q.answer_pos - (q.fact_pos + 1) > REACH:
                far += 1
                assert lookup(t, seen, q.answer_pos) is None  # no trace of the fact in view
        keys = t[(t >= KEY0) & (np.roll(t, 1) != 3)]  # fact keys (not after QUERY)
        assert len(keys) == len(set(keys.tolist()))  # unique within a training sequence
    assert far > 3 * len(seqs)  # plenty of far queries per sequence


def test_far_values_are_uniform(seqs: list) -> None:
    """The answer of a far query is a fresh uniform draw: every value occurs, none dominates."""
    spec = RecallSpec()
    vals = [q.value - VALUE0 for s in seqs for q in s.queries]
    counts = np.bincount(vals, minlength=spec.num_values)
    assert counts.min() > 0 and counts.max() < 3 * len(vals) / spec.num_values


def test_sepllm_keeps_the_facts_separator(seqs: list) -> None:
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=A, local_window=W)
    sink = SepLLMConfig(mode="streamingllm", separator_token_ids=[], init_tokens=A, local_window=W)
    ids = np.stack([s.tokens for s in seqs])
    import torch

    ids_t = torch.from_numpy(ids)
    keep_sep = dense_keep_mask(build_kept_set(ids_t, sep), W)  # [B, S, S]
    keep_sink = dense_keep_mask(build_kept_set(ids_t, sink), W)
    nosep = torch.from_numpy(np.where(ids == SEP, CLOSE, ids))
    assert torch.equal(dense_keep_mask(build_kept_set(nosep, sep), W), keep_sink)
    checked = 0
    for b, s in enumerate(seqs):
        for q in s.queries:
            if q.answer_pos - q.fact_sep_pos < W:  # the whole fact segment is out of the window
                continue
            checked += 1
            assert keep_sep[b, q.answer_pos, q.fact_sep_pos]
            assert not keep_sep[b, q.answer_pos, q.fact_pos : q.fact_pos + 2].any()
            assert not keep_sink[b, q.answer_pos, q.fact_pos : q.fact_pos + 3].any()
            # The separator's own window holds the fact it closes.
            assert keep_sep[b, q.fact_sep_pos, q.fact_pos : q.fact_pos + 2].all()
    assert checked > 0


def test_dataset_round_trip_and_aligned_samples(tmp_path) -> None:
    prefix = str(tmp_path / "recall")
    spec = RecallSpec()
    n_queries = write_dataset(prefix, spec, 6, 64, seed=3)
    ref = generate_many(spec, 6, 64, seed=3)
    ds = MMapIndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(6)] == [r.tokens.tolist() for r in ref]
    assert n_queries == sum(len(r.queries) for r in ref)
    with pytest.raises(FileExistsError, match="recall.bin"):
        write_dataset(prefix, spec, 6, 64, seed=3)
    # Documents of seq_length tokens: every training sample is one whole sequence + HEADER.
    train = GPTDataset("train", ds, np.arange(6), 5, 64, seed=1, cache_dir=str(tmp_path))
    docs = {tuple(r.tokens.tolist()) for r in ref}
    for i in range(len(train)):
        text = train[i]["text"]
        assert tuple(text[:64].tolist()) in docs and text[64] == HEADER


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_keys": 600}, "num_keys"),
        ({"num_values": 40}, "num_values"),
        ({"reuse_gap": 128}, "reuse_gap"),
        ({"query_prob": 1.0}, "query_prob"),
        ({"init_tokens": 0}, "init_tokens"),
    ],
)
def test_bad_spec_is_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RecallSpec(**kw)


@pytest.mark.parametrize(
    "mode, separators, flows",
    [
        ("full", True, True),
        ("sepllm", True, True),
        ("streamingllm", True, False),
        ("sepllm", False, False),
    ],
)
def test_far_fact_reaches_the_query_only_through_separators(
    mode: str, separators: bool, flows: bool
) -> None:
    """In a random 2-layer model (our real forward and kernels), the query's logits depend on
    a far fact's VALUE token (nonzero gradient) with full attention and SepLLM(w), and not at
    all (exactly zero) with StreamingLLM(w) or SepLLM(w) on separator-free data."""
    import torch

    from megatron.config.schema import ModelConfig
    from megatron.model.transformer import GPTModel

    torch.manual_seed(0)
    seq = generate_many(RecallSpec(separators=separators), 1, 128, seed=7)[0]
    q = next(q for q in seq.queries if q.answer_pos - q.fact_sep_pos > 2 * W)
    m = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        seq_length=128,
        max_position_embeddings=128,
    )
    rule = SepLLMConfig(
        mode=mode,
        separator_token_ids=[SEP] if mode == "sepllm" else [],
        init_tokens=A,
        local_window=W,
    )
    model = GPTModel(m, rule, vocab_size=512).eval()
    held: list = []
    model.embedding.register_forward_hook(lambda mod, i, out: held.append(out) or out.retain_grad())
    logits = model(torch.from_numpy(seq.tokens)[None])  # [1, S, V]
    logits[0, q.answer_pos].square().sum().backward()
    grad = held[0].grad[0]  # [S, D]: d(query logits) / d(embedding output)
    assert grad[q.answer_pos].abs().sum() > 0  # the query sees itself
    reached = grad[q.fact_pos + 1].abs().sum() > 0  # the fact's VALUE token
    assert bool(reached) == flows
