"""Reliability case 8: bit rot in a COMPLETE checkpoint is refused, naming the file.

COMPLETE holds a SHA-256 per file (megatron/checkpoint/checksums.py); resolve_tag verifies them
before any load. Unit tests on a small directory plus one end-to-end resume of a real
checkpoint with one flipped byte.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron.checkpoint.checksums import ChecksumError, verify, verify_all_ranks
from megatron.checkpoint.checksums import write_complete as complete
from megatron.checkpoint.layout import COMPLETE as COMPLETE_NAME
from tests.conftest import run_cli, write_config


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "global_step4"
    (d / "universal").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 64)
    (d / "universal" / "state.pt").write_bytes(b"x" * 1000)
    complete(d, COMPLETE_NAME, 4)
    return d


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_checkpoint_verifies(ckpt: Path) -> None:
    verify_all_ranks(ckpt, COMPLETE_NAME)


def test_flipped_byte_is_refused_naming_the_file(ckpt: Path) -> None:
    flip(ckpt / "universal" / "state.pt")
    with pytest.raises(ChecksumError, match=r"universal/state\.pt differs .* sha256"):
        verify_all_ranks(ckpt, COMPLETE_NAME)


def test_truncated_and_missing_files_are_named(ckpt: Path) -> None:
    model = ckpt / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:10])
    (ckpt / "universal" / "state.pt").unlink()
    with pytest.raises(ChecksumError) as err:
        verify_all_ranks(ckpt, COMPLETE_NAME)
    assert "mp_rank_00_model_states.pt has 10 bytes, 16,384 when written" in str(err.value)
    assert "state.pt is missing" in str(err.value)


def test_ranks_share_the_files(ckpt: Path) -> None:
    flip(ckpt / "mp_rank_00_model_states.pt")
    shares = [verify(ckpt, COMPLETE_NAME, r, 2) for r in range(2)]
    assert sum(len(s) for s in shares) == 1  # each file checked by exactly one rank


def test_old_marker_without_checksums_loads_with_a_warning(ckpt: Path, caplog) -> None:
    (ckpt / COMPLETE_NAME).write_text("4")
    with caplog.at_level(logging.WARNING, logger="megatron"):
        verify_all_ranks(ckpt, COMPLETE_NAME)
    assert "no checksums" in caplog.text


def test_resume_of_a_rotted_checkpoint_is_refused(tmp_path: Path, shakespeare) -> None:
    save = tmp_path / "ck"
    cfg = write_config(tmp_path, shakespeare, train_iters=2, checkpoint_factor=2, save=str(save))
    run_cli(["train.py", str(cfg)])
    flip(save / "global_step2" / "mp_rank_00_model_states.pt", at=2000)
    resume = write_config(
        tmp_path, shakespeare, "r.yml", train_iters=4, checkpoint_factor=2, load=str(save)
    )
    with pytest.raises(AssertionError) as err:
        run_cli(["train.py", str(resume)])
    assert "global_step2/mp_rank_00_model_states.pt differs from what was written" in str(err.value)
    assert "verify_checkpoint_checksums" in str(err.value)
