"""Reliability case 14: exact resume covers the whole log, evaluation included.

Each evaluation reads the next validation samples; the evaluation counter is saved with the
checkpoint (trainer_state.json) and restored, so a resumed run evaluates the same samples at
the same iterations as the uninterrupted one and logs the same validation losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config

pytestmark = pytest.mark.slow

# Evaluate every 2 steps on 1 batch, so each evaluation reads other samples.
SPEC = {"train_iters": 6, "eval_interval": 2, "eval_iters": 1, "checkpoint_factor": 2}


def logged(path: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r[key] for r in rows if key in r}


def test_validation_losses_after_resume_equal_the_uninterrupted_run(
    tmp_path: Path, shakespeare
) -> None:
    straight = write_config(tmp_path, shakespeare, "straight.yml", save=str(tmp_path / "a"), **SPEC)
    run_cli(["train.py", str(straight)])
    ref = logged(tmp_path / "straight.yml.jsonl", "valid/loss")
    assert sorted(ref) == [2, 4, 6] and len(set(ref.values())) == 3

    ck = str(tmp_path / "b")
    resumed = write_config(
        tmp_path, shakespeare, "resumed.yml", save=ck, load=ck, allow_fresh_start=True, **SPEC
    )
    run_cli(["train.py", str(resumed), "--set", "exit_interval=2"])
    out = run_cli(["train.py", str(resumed)])
    assert "resumed from" in out.stdout + out.stderr and "evaluation 1" in out.stdout + out.stderr
    got = logged(tmp_path / "resumed.yml.jsonl", "valid/loss")
    assert got == ref  # bit-equal, at every evaluation
    train_ref = logged(tmp_path / "straight.yml.jsonl", "train/step_loss")
    assert logged(tmp_path / "resumed.yml.jsonl", "train/step_loss") == train_ref
