"""End-to-end training through the real entry points, in fresh processes (gloo on CPU)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli, step_losses, write_config

pytestmark = pytest.mark.slow


def test_resume_reproduces_uninterrupted_run(tmp_path: Path, shakespeare) -> None:
    straight = write_config(tmp_path, shakespeare, "straight.yml", save=str(tmp_path / "a"))
    run_cli(["train.py", str(straight)])
    ref = step_losses(tmp_path / "straight.yml.jsonl")
    assert sorted(ref) == list(range(1, 9))

    resumed = write_config(
        tmp_path,
        shakespeare,
        "resumed.yml",
        save=str(tmp_path / "b"),
        load=str(tmp_path / "b"),
        allow_fresh_start=True,
    )
    run_cli(["train.py", str(resumed), "--set", "exit_interval=4"])
    assert (tmp_path / "b" / "latest").read_text() == "global_step4"
    out = run_cli(["train.py", str(resumed)])
    assert "resumed from" in out.stdout + out.stderr
    got = step_losses(tmp_path / "resumed.yml.jsonl")
    assert sorted(got) == list(range(1, 9))
    for it in range(1, 9):
        assert got[it] == ref[it], f"iteration {it}: {got[it]} != {ref[it]}"


def test_two_process_data_parallel_matches_single_process(tmp_path: Path, shakespeare) -> None:
    """deepy.py with 2 ranks = one process with accumulation (ZeRO stages: tests/parallel)."""
    zero = {"zero_optimization": {"stage": 0}, "hidden_dropout": 0.0}
    single = write_config(tmp_path, shakespeare, "single.yml", train_iters=4, **zero)
    run_cli(["train.py", str(single)])
    # Same global batch (4): 2 ranks x micro 2 x accumulation 1 instead of 1 x 2 x 2.
    dp = write_config(
        tmp_path,
        shakespeare,
        "dp.yml",
        train_iters=4,
        num_gpus=2,
        gradient_accumulation_steps=1,
        **zero,
    )
    out = run_cli(["deepy.py", "train.py", str(dp)])
    log = out.stdout + out.stderr
    sums = re.search(r"weight checksums per rank: (.*)", log).group(1).split()
    assert len(sums) == 2 and sums[0] == sums[1], sums
    ref, got = step_losses(tmp_path / "single.yml.jsonl"), step_losses(tmp_path / "dp.yml.jsonl")
    assert sorted(got) == [1, 2, 3, 4]
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-5, abs=1e-6)


def test_bf16_with_zero2_trains(tmp_path: Path, shakespeare) -> None:
    cfg = write_config(
        tmp_path,
        shakespeare,
        precision="bfloat16",
        zero_optimization={"stage": 2},
        train_iters=6,
        lr=5e-3,
    )
    proc = run_cli(["train.py", str(cfg)])
    losses = step_losses(tmp_path / "c.yml.jsonl")
    assert losses[6] < losses[1]
    assert BF16_ACCUMULATION_WARNING not in proc.stdout + proc.stderr


BF16_ACCUMULATION_WARNING = "micro-batch gradients of each step in bf16"


def test_bf16_at_zero0_warns_about_bf16_gradient_accumulation(tmp_path: Path, shakespeare) -> None:
    cfg = write_config(
        tmp_path, shakespeare, precision="bfloat16", zero_optimization={"stage": 0}, train_iters=1
    )  # gradient_accumulation_steps 2
    proc = run_cli(["train.py", str(cfg)])
    assert BF16_ACCUMULATION_WARNING in proc.stdout + proc.stderr
    # the advice the warning gives trains (DeepSpeed's BF16 optimizer) and is not warned about
    fp32_accum = {"data_types": {"grad_accum_dtype": "fp32"}}
    cfg = write_config(
        tmp_path,
        shakespeare,
        "fp32_accum.yml",
        precision="bfloat16",
        zero_optimization={"stage": 1},
        deepspeed_extra=fp32_accum,
        train_iters=1,
    )
    proc = run_cli(["train.py", str(cfg)])
    assert BF16_ACCUMULATION_WARNING not in proc.stdout + proc.stderr
    assert math.isfinite(step_losses(tmp_path / "fp32_accum.yml.jsonl")[1])


def test_finetune_loads_weights_and_restarts(tmp_path: Path, shakespeare) -> None:
    base = write_config(tmp_path, shakespeare, "base.yml", save=str(tmp_path / "base"))
    run_cli(["train.py", str(base)])
    ft = write_config(
        tmp_path,
        shakespeare,
        "ft.yml",
        load=str(tmp_path / "base"),
        finetune=True,
        save=str(tmp_path / "ft"),
        train_iters=2,
    )
    out = run_cli(["train.py", str(ft)])
    first = step_losses(tmp_path / "ft.yml.jsonl")[1]
    base_first = step_losses(tmp_path / "base.yml.jsonl")[1]
    assert first < base_first - 0.5  # starts from trained weights, not from scratch
    assert "resumed from" in out.stdout + out.stderr
    assert (tmp_path / "ft" / "latest").read_text() == "global_step2"  # iteration restarted


def test_missing_checkpoint_is_an_error(tmp_path: Path, shakespeare) -> None:
    cfg = write_config(tmp_path, shakespeare, load=str(tmp_path / "nothing"))
    with pytest.raises(AssertionError, match="holds no checkpoint"):
        run_cli(["train.py", str(cfg)])


def test_keep_last_and_complete_markers(tmp_path: Path, shakespeare) -> None:
    cfg = write_config(
        tmp_path,
        shakespeare,
        save=str(tmp_path / "ck"),
        checkpoint_factor=2,
        keep_last_n_checkpoints=2,
    )
    out = run_cli(["train.py", str(cfg)])
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.glob("global_step*")) == ["global_step6", "global_step8"]
    log = out.stdout + out.stderr
    summary = re.search(
        r"run finished at iteration 8 \| train loss ([\d.]+) .*\| validation loss ([\d.]+) \| "
        r"last checkpoint (\S+) \| wall time \d+:\d\d:\d\d for 8 steps \| ([\d,]+) tokens/s",
        log,
    )
    assert summary, log[-2000:]
    last_valid = re.findall(r"validation at iter 8 \| loss ([\d.]+)", log)
    assert summary.group(2) == last_valid[-1]  # the summary repeats the final evaluation
    assert Path(summary.group(3)) == ck / "global_step8"
    assert (ck / "latest").read_text() == "global_step8"
    assert (ck / "global_step8" / "COMPLETE").is_file()
    saved = yaml.safe_load((ck / "global_step8" / "config.yml").read_text())
    assert saved["training"]["train_batch_size"] == 4  # the resolved (derived) batch triple
    assert (ck / "global_step8" / "configs" / "c.yml").is_file()
    # The rerun (the README's main job run twice) resumes, has nothing to train, and says so.
    rerun = run_cli(["train.py", str(cfg), "--set", f"load={ck}"])
    assert f"nothing to train: {ck / 'global_step8'} is at iteration 8" in rerun.stderr + (
        rerun.stdout
    ), rerun.stderr[-2000:]


@pytest.mark.parametrize("mode", ["sepllm", "streamingllm"])
def test_sparse_attention_model_trains(tmp_path: Path, shakespeare, mode: str) -> None:
    from megatron.data.tokenizers import tokenizer_for_file
    from megatron.sepllm.separators import separator_ids

    seps = separator_ids(tokenizer_for_file(shakespeare[1])) if mode == "sepllm" else []
    cfg = write_config(
        tmp_path,
        shakespeare,
        train_iters=12,
        lr=5e-3,
        hidden_dropout=0.0,
        sepllm={
            "mode": mode,
            "separator_token_ids": seps,
            "init_tokens": 4,
            "local_window": 8,
            "print_kv_ratio": True,
            "print_ratio_intervals": 4,
        },
    )
    out = run_cli(["train.py", str(cfg)])
    losses = step_losses(tmp_path / "c.yml.jsonl")
    assert sum(losses[i] for i in (10, 11, 12)) < sum(losses[i] for i in (1, 2, 3)) - 1.0
    ratios = [float(x) for x in re.findall(r"kv_ratio/w8 ([0-9.]+)", out.stdout + out.stderr)]
    assert ratios and all(0.0 < r < 1.0 for r in ratios)
