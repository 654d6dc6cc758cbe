"""Reliability case 1: a diverged run stops at the step it diverges, or skips that step.

A non-finite loss or grad norm is caught at the step it happens (the one guard in
Trainer._nonfinite_step, with clipping on or off): the run exits non-zero naming the step and
the value, saves nothing of the diverged state and prunes no finite checkpoint. With
skip_nonfinite_steps the update is dropped and the skipped steps are counted in the log.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from megatron.training.metrics import format_line
from tests.conftest import run_cli, write_config

# lr 1e3 diverges within a few steps; a checkpoint every step, only the newest kept, so a
# non-finite save or a prune of the last good one would show.
DIVERGE = {"lr": 1e3, "min_lr": 0.0, "checkpoint_factor": 1, "keep_last_n_checkpoints": 1}


def finite_weights(step_dir: Path) -> bool:
    state = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=False)
    return all(torch.isfinite(t).all() for t in state["module"].values())


def test_log_line_formats_missing_and_nonfinite_values() -> None:
    values = {"train/lr": 1e-3, "train/tokens_per_s": 1.0, "train/ms_per_iter": 1.0}
    line = format_line(3, 8, {**values, "train/loss": math.nan, "train/grad_norm": None}, 0)
    assert "loss nan" in line and "grad norm n/a" in line
    line = format_line(3, 8, {**values, "train/loss": 1.0, "train/skipped_steps": 2}, 0)
    assert "grad norm n/a" in line and "skipped 2" in line


@pytest.mark.slow
@pytest.mark.parametrize("clipping", [0.0, 1.0])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, shakespeare, clipping: float
) -> None:
    ck = tmp_path / "ck"
    cfg = write_config(tmp_path, shakespeare, save=str(ck), gradient_clipping=clipping, **DIVERGE)
    with pytest.raises(AssertionError) as exc:
        run_cli(["train.py", str(cfg)])
    out = str(exc.value)
    assert re.search(r"exited [1-9]", out)
    found = re.search(r"iteration (\d+): non-finite (loss|grad norm) (nan|inf)", out)
    assert found, out[-3000:]
    bad = int(found.group(1))
    assert "set skip_nonfinite_steps: true" in out
    assert "NoneType" not in out
    latest = (ck / "latest").read_text()
    assert latest == f"global_step{bad - 1}"  # the last step before the divergence
    assert sorted(p.name for p in ck.glob("global_step*")) == [latest]
    assert finite_weights(ck / latest)


@pytest.mark.slow
def test_skip_nonfinite_steps_drops_the_update_and_counts_it(tmp_path: Path, shakespeare) -> None:
    ck = tmp_path / "ck"
    cfg = write_config(
        tmp_path,
        shakespeare,
        save=str(ck),
        gradient_clipping=0.0,
        skip_nonfinite_steps=True,
        **DIVERGE,
    )
    out = run_cli(["train.py", str(cfg)])
    log = out.stdout + out.stderr
    assert re.search(r"iteration \d+: non-finite .*: step skipped, weights unchanged", log)
    counts = [int(n) for n in re.findall(r"\| skipped (\d+) \|", log)]
    state = json.loads((ck / "global_step8" / "trainer_state.json").read_text())
    assert counts and counts[-1] == state["skipped_steps"] > 0
    assert finite_weights(ck / "global_step8")
