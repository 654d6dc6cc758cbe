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

from megatron.checkpoint.safe_load import load_file
from megatron.training.metrics import format_line
from megatron.training.trainer import MAX_CONSECUTIVE_SKIPS, SKIP_WINDOW, SkipBudget
from tests.conftest import run_cli, write_config

# lr 1e3 diverges within a few steps; a checkpoint every step, only the newest kept, so a
# non-finite save or a prune of the last good one would show.
DIVERGE = {"lr": 1e3, "min_lr": 0.0, "checkpoint_factor": 1, "keep_last_n_checkpoints": 1}


def finite_weights(step_dir: Path) -> bool:
    state = load_file(step_dir / "mp_rank_00_model_states.pt")
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
@pytest.mark.parametrize("clipping", [0.0, 1.0])
def test_skip_nonfinite_steps_drops_the_update_and_stops_a_diverging_run(
    tmp_path: Path, shakespeare, clipping: float
) -> None:
    """Skipped steps are counted and saved; a run that keeps skipping stops (it used to skip
    17 of 20 steps with rc 0). With clipping the skip decides on the norm fp32 clipping sees
    (it used to never skip there and then advise setting the option already set)."""
    ck = tmp_path / "ck"
    cfg = write_config(
        tmp_path,
        shakespeare,
        save=str(ck),
        gradient_clipping=clipping,
        skip_nonfinite_steps=True,
        **{**DIVERGE, "train_iters": 20},
    )
    with pytest.raises(AssertionError) as exc:
        run_cli(["train.py", str(cfg)])
    log = str(exc.value)
    assert re.search(r"iteration \d+: non-finite .*: step skipped, weights unchanged", log), log
    assert f"{MAX_CONSECUTIVE_SKIPS} consecutive steps skipped" in log
    assert "set skip_nonfinite_steps" not in log
    counts = [int(n) for n in re.findall(r"\| skipped (\d+) \|", log)]
    latest = (ck / "latest").read_text().strip()
    state = json.loads((ck / latest / "trainer_state.json").read_text())
    assert counts and state["skipped_steps"] > 0
    assert finite_weights(ck / latest)


def test_skip_budget_stops_a_streak_and_a_high_fraction() -> None:
    budget = SkipBudget()
    results = [budget.record(True) for _ in range(MAX_CONSECUTIVE_SKIPS)]
    assert results[:-1] == [None] * (MAX_CONSECUTIVE_SKIPS - 1) and "consecutive" in results[-1]
    budget = SkipBudget()  # every 4th step skipped: never a streak, 25% of the steps
    results = [budget.record(i % 4 == 0) for i in range(SKIP_WINDOW)]
    assert results[:-1] == [None] * (SKIP_WINDOW - 1)
    assert f"5 of this run's {SKIP_WINDOW} steps skipped" in results[-1]
    budget = SkipBudget()  # 1 in 20: a rare bad batch, never stops
    assert all(budget.record(i % 20 == 7) is None for i in range(200))
