"""Reliability case 2: loading a checkpoint never runs code stored in it.

Unit tests of megatron/checkpoint/safe_load.py (a malicious `__reduce__` in our files and in a
DeepSpeed model-states file; the opt-in key; corrupted files named), plus one end-to-end
resume from a tampered `rng_rank0.pt`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from megatron.checkpoint import checksums, layout, safe_load
from megatron.checkpoint.safe_load import CheckpointLoadError
from tests.conftest import run_cli, write_config


class Payload:
    """Unpickling this runs `os.system`: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tampered(path: Path, marker: Path) -> Path:
    torch.save({"torch": torch.get_rng_state(), "evil": Payload(marker)}, path)
    return path


def test_malicious_rng_file_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    rng = tampered(tmp_path / "rng_rank0.pt", marker)
    with pytest.raises(CheckpointLoadError) as err:
        safe_load.load_file(rng)
    assert not marker.exists()
    assert str(rng) in str(err.value) and "allow_unsafe_checkpoint_load: true" in str(err.value)


def test_deepspeed_loads_go_through_the_safe_engine(tmp_path: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class Engine:  # the one attribute DeepSpeed's load_checkpoint reads files through
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    safe_load.install(engine, allow_unsafe=False)
    marker = tmp_path / "pwned"
    states = tampered(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointLoadError, match="mp_rank_00_model_states.pt"):
        engine.checkpoint_engine.load(str(states), map_location="cpu")
    assert not marker.exists()
    # What DeepSpeed legitimately stores still loads (its enum, numpy state).
    import numpy as np
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ok = tmp_path / "ok.pt"
    torch.save({"stage": ZeroStageEnum.optimizer_states, "np": np.random.get_state()}, ok)
    assert engine.checkpoint_engine.load(str(ok))["stage"] == ZeroStageEnum.optimizer_states


def test_opt_in_loads_old_files_with_a_warning(tmp_path: Path, caplog) -> None:
    old = tmp_path / "old.pt"
    torch.save({"obj": logging.Formatter("%(message)s")}, old)  # not allowlisted, harmless
    with pytest.raises(CheckpointLoadError):
        safe_load.load_file(old)
    with caplog.at_level(logging.WARNING, logger="megatron"):
        assert isinstance(safe_load.load_file(old, allow_unsafe=True)["obj"], logging.Formatter)
    assert "allow_unsafe_checkpoint_load" in caplog.text and str(old) in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_file_is_named(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "rng_rank0.pt"
    torch.save({"torch": torch.get_rng_state()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00junk" * 50)
    with pytest.raises(CheckpointLoadError, match=r"rng_rank0\.pt .* corrupted or truncated"):
        safe_load.load_file(path)


def test_resume_from_tampered_rng_file_is_refused(tmp_path: Path, shakespeare) -> None:
    """End to end: even with COMPLETE's checksums rewritten to match (an attacker with write
    access can do that), the resume stops with the file and the key named, running nothing."""
    save = tmp_path / "ck"
    cfg = write_config(tmp_path, shakespeare, train_iters=2, checkpoint_factor=2, save=str(save))
    run_cli(["train.py", str(cfg)])
    step = save / "global_step2"
    marker = tmp_path / "pwned"
    tampered(step / "rng_rank0.pt", marker)
    manifest = json.loads((step / layout.COMPLETE).read_text())
    checksums.write_complete(step, layout.COMPLETE, manifest["iteration"])
    resume = write_config(
        tmp_path, shakespeare, "r.yml", train_iters=4, checkpoint_factor=2, load=str(save)
    )
    with pytest.raises(AssertionError) as err:
        run_cli(["train.py", str(resume)])
    assert not marker.exists()
    assert "rng_rank0.pt" in str(err.value) and "allow_unsafe_checkpoint_load" in str(err.value)
