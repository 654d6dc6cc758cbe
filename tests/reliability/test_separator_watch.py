"""Reliability case 9 (second half): a SepLLM batch without any separator is reported."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.stats import SeparatorWatch


def test_batches_without_separators_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    watch = SeparatorWatch(SepLLMConfig(mode="sepllm", separator_token_ids=[7, 9]))
    with caplog.at_level(logging.WARNING, logger="megatron"):
        watch.check(torch.tensor([[1, 2, 9, 4]]))  # holds a separator: silent
        assert not caplog.records
        watch.check(torch.tensor([[1, 2, 3, 4], [5, 6, 8, 0]]))
    assert (watch.batches, watch.without) == (2, 1)
    assert "1 of 2 batches so far hold none of the separator ids [7, 9]" in caplog.text


def test_other_modes_and_other_ranks_stay_silent(caplog: pytest.LogCaptureFixture) -> None:
    no_sep = torch.zeros(2, 8, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="megatron"):
        SeparatorWatch(SepLLMConfig(mode="streamingllm")).check(no_sep)
        SeparatorWatch(SepLLMConfig(mode="full")).check(no_sep)
        other_rank = SeparatorWatch(SepLLMConfig(mode="sepllm", separator_token_ids=[3]), False)
        other_rank.check(no_sep)
    assert other_rank.without == 1 and not caplog.records
