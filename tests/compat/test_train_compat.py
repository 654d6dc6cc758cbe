"""Tiny real training runs from a NeoX-style Pythia config (NeoX's command form, fp16 block and
no-op keys) and from a SepLLM sample-style config, and a resume that changes the learning rate
(refused without override_lr_scheduler, applied with it). CPU: --set precision=fp32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron.config.loader import load_config
from megatron.config.validate import finalize
from megatron.training.preflight import resume_config_errors
from tests.conftest import free_port, run_cli, step_losses, write_config

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _sets(**values: object) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def test_neox_pythia_config_trains_as_neox_users_launch_it(tmp_path: Path, shakespeare) -> None:
    prefix, tokenizer = shakespeare
    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    overrides = _sets(
        precision="fp32",  # the config's fp16 block needs a GPU
        data_path=prefix,
        vocab_file=tokenizer,
        save=save,
        load="null",
        log_dir=tmp_path / "logs",
        master_port=free_port(),
        metrics_jsonl=metrics,
    )
    args = ["deepy.py", "train.py", "-d", str(HERE), "neox_pythia.yml", "neox_setup.yml"]
    out = run_cli([*args, *overrides])
    text = out.stdout + out.stderr
    assert "hostfile /mock_path not found: proceeding with local resources only" in text
    assert "bias_gelu_fusion=True accepted with no effect" in text
    losses = step_losses(metrics)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    # extra_save_iters [0, 1, 2] with checkpoint_factor 1000: those, and the last iteration.
    saved = sorted(p.name for p in save.iterdir() if p.name.startswith("global_step"))
    assert saved == ["global_step0", "global_step1", "global_step2", "global_step4"]


def test_sepllm_sample_style_config_trains(tmp_path: Path, shakespeare) -> None:
    prefix, tokenizer = shakespeare
    metrics = tmp_path / "m.jsonl"
    overrides = _sets(
        precision="fp32",
        data_path=prefix,
        vocab_file=tokenizer,
        master_port=free_port(),
        metrics_jsonl=metrics,
    )
    out = run_cli(["train.py", str(HERE / "sepllm_n64.yml"), *overrides])
    text = out.stdout + out.stderr
    assert "RECOMPILE_SEP_ATTN_KERNEL=False accepted with no effect" in text
    losses = step_losses(metrics)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())


def test_resume_with_a_new_lr_is_refused_or_applied(tmp_path: Path, shakespeare) -> None:
    """issue 22: a changed lr on resume was logged as 'config differs' and ignored."""
    save = tmp_path / "ckpt"
    cfg_path = write_config(
        tmp_path, shakespeare, "run.yml", save=str(save), load=str(save), allow_fresh_start=True
    )
    run_cli(["train.py", str(cfg_path), "--set", "exit_interval=4"])
    changed = load_config([cfg_path], {"lr": 1e-3})
    finalize(changed, world_size=1, vocab_size=1024)
    (error,) = resume_config_errors(changed, log_differences=False)
    assert "optimizer.lr: 0.002 -> 0.001" in error and "override_lr_scheduler" in error
    run_cli(["train.py", str(cfg_path), *_sets(lr=1e-3, override_lr_scheduler="true")])
    rows = [json.loads(line) for line in (tmp_path / "run.yml.jsonl").read_text().splitlines()]
    lr = {r["iteration"]: r["train/lr"] for r in rows if "train/lr" in r}
    # write_config: 8 iterations, warmup 0.25 (2 steps), cosine to min_lr 1e-4. Iteration 5
    # runs optimizer step 4 with the new peak lr.
    expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * (4 - 2) / (8 - 2))) * (1e-3 - 1e-4)
    assert lr[5] == pytest.approx(expected, rel=1e-6)
    old = 1e-4 + 0.5 * (1 + math.cos(math.pi * (3 - 2) / (8 - 2))) * (2e-3 - 1e-4)
    assert lr[4] == pytest.approx(old, rel=1e-6)  # before the resume: the old schedule
