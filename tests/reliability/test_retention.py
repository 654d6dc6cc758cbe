"""Reliability case 5: retention never deletes a good checkpoint.

Only complete checkpoints (with a COMPLETE marker) count toward keep_last_n_checkpoints; an
incomplete directory left by a crash is reported, and deleted only once it is older than the
newest complete checkpoint; invalid values are refused up front.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron.config import ConfigError, validate
from megatron.config.loader import build_config, merge_sources
from megatron.training.checkpoint import COMPLETE, prune


def make_dirs(root: Path, complete: list[int], incomplete: list[int]) -> None:
    for n in complete + incomplete:
        (root / f"global_step{n}").mkdir(parents=True)
        (root / f"global_step{n}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for n in complete:
        (root / f"global_step{n}" / COMPLETE).write_text(str(n))


def left(root: Path) -> list[str]:
    return sorted((p.name for p in root.glob("global_step*")), key=lambda s: int(s[11:]))


def test_incomplete_directories_do_not_count_toward_the_limit(tmp_path: Path, caplog) -> None:
    # A crash during the save of step 8 left global_step8 without COMPLETE.
    make_dirs(tmp_path, complete=[2, 4, 6], incomplete=[8])
    with caplog.at_level(logging.WARNING, logger="megatron"):
        deleted = prune(tmp_path, keep_last=2, keep="global_step6")
    assert [p.name for p in deleted] == ["global_step2"]
    assert left(tmp_path) == ["global_step4", "global_step6", "global_step8"]
    assert "global_step8 is incomplete (no COMPLETE marker)" in caplog.text
    assert "kept (not older than the newest complete checkpoint)" in caplog.text


def test_incomplete_directory_older_than_the_newest_complete_one_is_cleaned(
    tmp_path: Path, caplog
) -> None:
    make_dirs(tmp_path, complete=[2, 4, 8], incomplete=[6])
    with caplog.at_level(logging.WARNING, logger="megatron"):
        prune(tmp_path, keep_last=2, keep="global_step8")
    assert left(tmp_path) == ["global_step4", "global_step8"]
    assert "global_step6 is incomplete" in caplog.text and "deleting it" in caplog.text


def test_checkpoint_named_by_latest_is_never_deleted(tmp_path: Path) -> None:
    # A run resumed from an older iteration saved global_step4 while 6 and 8 exist.
    make_dirs(tmp_path, complete=[4, 6, 8], incomplete=[])
    prune(tmp_path, keep_last=1, keep="global_step4")
    assert left(tmp_path) == ["global_step4", "global_step8"]


def test_without_a_limit_only_stale_incomplete_directories_go(tmp_path: Path) -> None:
    make_dirs(tmp_path, complete=[2, 4], incomplete=[3, 6])
    prune(tmp_path, keep_last=None)
    assert left(tmp_path) == ["global_step2", "global_step4", "global_step6"]


@pytest.mark.parametrize("value", [-1, 0])
def test_invalid_keep_last_is_refused(value: int) -> None:
    cfg = build_config(
        merge_sources(
            [
                (
                    "test",
                    {
                        "train_micro_batch_size_per_gpu": 2,
                        "data_path": "data/x",
                        "keep_last_n_checkpoints": value,
                    },
                )
            ]
        )
    )
    with pytest.raises(ConfigError, match=f"keep_last_n_checkpoints must be >= 1, got {value}"):
        validate(cfg)
