"""Reliability case 13: the real error is the last thing printed, and load errors name the
file and the config key.

End to end: a rank that fails on a truncated checkpoint file under deepy.py: the last lines
are the rank's error naming the file (repeated by deepy.py after the launcher's own lines), and
no line carries a serialized config. Units: a shape mismatch names the parameter, both shapes
and what to compare.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron.checkpoint.checksums import write_complete
from megatron.checkpoint.layout import COMPLETE as COMPLETE_NAME
from megatron.config.schema import CheckpointConfig
from megatron.training import checkpoint, universal
from tests.conftest import ROOT, run_cli, write_config


def test_rank_error_is_the_last_line_under_deepy(tmp_path: Path, shakespeare) -> None:
    import subprocess
    import sys

    save = tmp_path / "ck"
    cfg = write_config(tmp_path, shakespeare, train_iters=2, checkpoint_factor=2, save=str(save))
    run_cli(["train.py", str(cfg)])
    step = save / "global_step2"
    states = step / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:3000])
    write_complete(step, COMPLETE_NAME, 2)  # checksums match: the read itself must fail clearly
    resume = write_config(tmp_path, shakespeare, "r.yml", train_iters=4, load=str(save))
    proc = subprocess.run(
        [sys.executable, "deepy.py", "train.py", str(resume), "--num-gpus", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    tail = proc.stderr.strip().splitlines()[-2:]  # deepy.py's report of the failed rank
    assert tail[0].startswith("deepy.py: training failed"), proc.stderr[-3000:]
    assert "rank0: CheckpointLoadError: checkpoint file" in tail[1]
    assert "mp_rank_00_model_states.pt" in tail[1] and "corrupted or truncated" in tail[1]
    longest = max(len(line) for line in (proc.stdout + proc.stderr).splitlines())
    assert longest < 1500, "a serialized config (or other blob) is in the launch log"


def test_shape_mismatch_names_parameter_shapes_and_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        universal._fit(torch.zeros(8, 4), torch.zeros(8, 6), "blocks.0.mlp.fc1.weight", tmp_path)
    msg = str(err.value)
    assert "blocks.0.mlp.fc1.weight" in msg and "(8, 4)" in msg and "(8, 6)" in msg
    assert str(tmp_path) in msg


def test_deepspeed_load_errors_name_the_checkpoint_and_key(tmp_path: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    def load_checkpoint(*args, **kwargs):
        raise RuntimeError(
            "Error(s) in loading state_dict for GPTModel:\n\tsize mismatch for embed.weight: "
            "copying a param with shape torch.Size([512, 64]) from checkpoint, the shape in "
            "current model is torch.Size([512, 96])."
        )

    engine = SimpleNamespace(
        checkpoint_engine=TorchCheckpointEngine(), load_checkpoint=load_checkpoint
    )
    ck = CheckpointConfig(load=str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(engine, ck, "global_step2")
    msg = str(err.value)
    assert f"loading checkpoint {tmp_path / 'global_step2'} (checkpoint.load = {tmp_path})" in msg
    assert "size mismatch for embed.weight" in msg and "config.yml" in msg
