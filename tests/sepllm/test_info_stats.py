"""SepInfo construction, tensor round trip, and kept statistics vs dense-mask counts."""

from __future__ import annotations

import pytest
import torch

from megatron.config.schema import SepLLMConfig
from megatron.sepllm.info import SepInfo, build_sep_info, dense_keep_mask
from megatron.sepllm.stats import kept_stats


def _cfg(**kw) -> SepLLMConfig:  # noqa: ANN003
    base = {"mode": "sepllm", "separator_token_ids": [3], "init_tokens": 2, "local_window": 4}
    return SepLLMConfig(**{**base, **kw})


def test_full_mode_has_no_info() -> None:
    assert build_sep_info(torch.zeros(2, 8, dtype=torch.long), SepLLMConfig(mode="full")) is None


def test_compact_positions_and_padding() -> None:
    # row 0: separators at 1 (inside the initial range [0, 2)), 4, 6
    # row 1: two leading pads (pad id 3 is also a separator id), separators at 5
    ids = torch.tensor([[5, 3, 5, 5, 3, 5, 3, 5], [3, 3, 5, 5, 5, 3, 5, 5]])
    info = build_sep_info(ids, _cfg(batch_adaptive_init_pos=True, pad_token_id=3))
    assert info.init_start.tolist() == [0, 2]
    assert info.is_sep.tolist()[1] == [False, False, False, False, False, True, False, False]
    assert info.sep_count.tolist() == [2, 1]
    assert info.sep_pos.tolist() == [[4, 6], [5, 8]]  # padded with S = 8
    assert info.init_tokens == 2


def test_streamingllm_ignores_separators() -> None:
    ids = torch.tensor([[3, 3, 3, 3]])
    info = build_sep_info(ids, _cfg(mode="streamingllm"))
    assert not info.is_sep.any() and info.sep_pos.shape == (1, 0)


def test_tensor_round_trip() -> None:
    ids = torch.randint(0, 6, (3, 20), generator=torch.Generator().manual_seed(0))
    info = build_sep_info(ids, _cfg(batch_adaptive_init_pos=True, pad_token_id=0))
    for tensors in (info.to_tensors(), (info.is_sep, info.init_start, info.to_tensors()[-1])):
        back = SepInfo.from_tensors(*tensors)
        assert back.init_tokens == info.init_tokens
        for name in ("is_sep", "init_start", "sep_pos", "sep_count"):
            assert torch.equal(getattr(back, name), getattr(info, name)), name


def _counts_from_dense(info: SepInfo, w: int) -> tuple[float, float]:
    keep = dense_keep_mask(info, w)  # [B, S, S]
    S = info.seq_len
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
    info = build_sep_info(ids, cfg)
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
    stats = kept_stats(build_sep_info(ids, _cfg(local_window=64)), [64], S)
    assert 0.05 < stats["density/w64"] < 0.2  # about 10% separators
