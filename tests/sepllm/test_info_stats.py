"""KeptSet construction (from token ids and from a cache), and kept statistics vs dense-mask
counts."""

from __future__ import annotations

import pytest
import torch

from megatron.config.schema import SepLLMConfig
from megatron.sepllm.info import KeptSet, build_kept_set, dense_keep_mask
from megatron.sepllm.stats import kept_stats


def _cfg(**kw) -> SepLLMConfig:
    base = {"mode": "sepllm", "separator_token_ids": [3], "init_tokens": 2, "local_window": 4}
    return SepLLMConfig(**{**base, **kw})


def test_full_mode_has_no_info() -> None:
    assert build_kept_set(torch.zeros(2, 8, dtype=torch.long), SepLLMConfig(mode="full")) is None


def test_compact_positions_and_padding() -> None:
    # row 0: separators at 1 (inside the initial range [0, 2)), 4, 6
    # row 1: two leading pads (pad id 3 is also a separator id), separators at 5
    ids = torch.tensor([[5, 3, 5, 5, 3, 5, 3, 5], [3, 3, 5, 5, 5, 3, 5, 5]])
    info = build_kept_set(ids, _cfg(batch_adaptive_init_pos=True, pad_token_id=3))
    assert info.init_start.tolist() == [0, 2]
    assert info.is_sep.tolist()[1] == [False, False, False, False, False, True, False, False]
    assert info.sep_count.tolist() == [2, 1]
    assert info.sep_pos.tolist() == [[4, 6], [5, 8]]  # padded with S = 8
    assert info.init_tokens == 2


def test_streamingllm_ignores_separators() -> None:
    ids = torch.tensor([[3, 3, 3, 3]])
    info = build_kept_set(ids, _cfg(mode="streamingllm"))
    assert not info.is_sep.any() and info.sep_pos.shape == (1, 0)


FIELDS = ("key_pos", "is_sep", "init_start", "query_pos", "sep_pos", "sep_count")


def test_training_layout() -> None:
    ids = torch.tensor([[5, 3, 5, 3, 5, 5]])
    kept = build_kept_set(ids, _cfg())
    assert kept.aligned and (kept.q_len, kept.kv_len) == (6, 6)
    assert kept.key_pos.tolist() == [list(range(6))] == kept.query_pos.tolist()


def test_cache_holding_everything_equals_the_ids_kept_set() -> None:
    """A cache that holds every token of the batch (positions 0..S-1, queries = all of them)
    describes exactly the training kept set."""
    ids = torch.randint(0, 6, (3, 20), generator=torch.Generator().manual_seed(0))
    ids[1, :4] = 0  # left padding
    for query_pos in (torch.arange(20), torch.arange(20).expand(3, 20)):
        from_ids = build_kept_set(ids, _cfg(batch_adaptive_init_pos=True, pad_token_id=0))
        cache = KeptSet.from_cache(
            key_pos=torch.arange(20).expand(3, 20),
            is_sep=from_ids.is_sep.clone(),
            init_start=from_ids.init_start.clone(),
            init_tokens=from_ids.init_tokens,
            query_pos=query_pos,
        )
        assert cache.aligned and cache.init_tokens == from_ids.init_tokens
        for name in FIELDS:
            assert torch.equal(getattr(cache, name), getattr(from_ids, name)), name
        for w in (1, 3, 8):
            assert torch.equal(dense_keep_mask(cache, w), dense_keep_mask(from_ids, w))


def test_cache_kept_set_of_a_decode_step() -> None:
    # A compacted cache: initial tokens 0, 1, the separators at 5 and 9, the window 14..17;
    # one query at position 17 (the newest cached key).
    key_pos = torch.tensor([[0, 1, 5, 9, 14, 15, 16, 17]])
    is_sep = torch.tensor([[False, True, True, True, False, True, False, False]])
    kept = KeptSet.from_cache(key_pos, is_sep, torch.tensor([0]), 2, torch.tensor([17]))
    assert not kept.aligned and (kept.q_len, kept.kv_len) == (1, 8)
    assert kept.sep_pos.tolist() == [[2, 3, 5]]  # key indices; key 1 is an initial token
    assert kept.sep_count.tolist() == [3]
    # window 3: keys at 15, 16, 17; plus the initial tokens and the separators
    expected = [True, True, True, True, False, True, True, True]
    assert dense_keep_mask(kept, 3).tolist() == [[expected]]
    with pytest.raises(ValueError, match="query_pos"):
        KeptSet.from_cache(key_pos, is_sep, torch.tensor([0]), 2, torch.arange(9))
    with pytest.raises(ValueError, match="aligned"):
        kept_stats(kept, [3], 8)


def _counts_from_dense(info: KeptSet, w: int) -> tuple[float, float]:
    keep = dense_keep_mask(info, w)  # [B, S, S]
    S = info.kv_len
    density = (keep.sum((1, 2)).double() / (S * (S + 1) / 2)).mean().item()
    kv = (keep[:, -1].sum(1).double() / S).mean().item()
    return kv, density


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("a", [0, 1, 4])
def test_stats_match_dense_counts(adaptive: bool, a: int) -> None:
    gen = torch.Generator().manual_seed(a + 10 * adaptive)
    S = 97
    ids = torch.randint(1, 8, (4, S), generator=gen)
    for b in range(4):
        ids[b, : 9 * b] = 0  # left padding of different lengths
    cfg = _cfg(separator_token_ids=[3, 0], init_tokens=a, batch_adaptive_init_pos=adaptive)
    info = build_kept_set(ids, cfg)
    windows = [1, 8, 8, 30, 97, 200]
    stats = kept_stats(info, windows, S)
    for w in set(windows):
        kv, density = _counts_from_dense(info, w)
        assert stats[f"kv_ratio/w{w}"] == pytest.approx(kv, abs=1e-12)
        assert stats[f"density/w{w}"] == pytest.approx(density, abs=1e-12)
    assert stats["density/w97"] == pytest.approx(1.0)  # window >= S is full attention
    assert stats["density/mean"] == pytest.approx(
        sum(stats[f"density/w{w}"] for w in windows) / len(windows)
    )


def test_stats_large_sequence_is_cheap() -> None:
    S = 65536  # a dense mask would be 4 G entries
    ids = torch.randint(0, 10, (1, S), generator=torch.Generator().manual_seed(0))
    stats = kept_stats(build_kept_set(ids, _cfg(local_window=64)), [64], S)
    assert 0.05 < stats["density/w64"] < 0.2  # about 10% separators
