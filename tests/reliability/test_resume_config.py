"""Reliability case 7: a resume compares the checkpoint's own config with the new one.

Architecture changes (model section, the SepLLM kept set, the padded vocabulary) are refused
unless finetune; a changed batch resumes at the saved consumed_samples (not iteration x the new
batch); every other difference is listed in the log.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import yaml

from megatron.config.loader import build_config, config_to_dict, merge_sources
from megatron.config.validate import finalize
from megatron.training import preflight
from megatron.training.checkpoint import COMPLETE, TRAINER_STATE
from tests.conftest import MINIMAL_CONFIG, run_cli, write_config


def cfg(vocab: int = 1024, **kw):
    return finalize(build_config(merge_sources([("test", {**MINIMAL_CONFIG, **kw})])), 1, vocab)


def fake_checkpoint(root: Path, vocab: int = 1024) -> Path:
    """A checkpoint directory as far as the comparison reads it."""
    step = root / "global_step4"
    step.mkdir(parents=True)
    (step / COMPLETE).write_text("4")
    (step / "config.yml").write_text(yaml.safe_dump(config_to_dict(cfg(vocab))))
    d = cfg(vocab).derived
    shape = {"vocab_size": d.vocab_size, "padded_vocab_size": d.padded_vocab_size}
    (step / TRAINER_STATE).write_text(json.dumps({"iteration": 4, "run_shape": shape}))
    (root / "latest").write_text("global_step4")
    return root


@pytest.mark.parametrize(
    ("change", "shown"),
    [
        ({"num_attention_heads": 8}, "model.num_attention_heads: 4 -> 8"),
        ({"sepllm": {"mode": "streamingllm"}}, "sepllm.mode: 'full' -> 'streamingllm'"),
        ({"vocab": 2000}, "vocab size: 1024 -> 2000; padded vocab size: 1024 -> 2048"),
    ],
)
def test_architecture_change_is_refused_unless_finetune(tmp_path: Path, change, shown) -> None:
    ck = str(fake_checkpoint(tmp_path / "ck"))
    (err,) = preflight.resume_config_errors(cfg(load=ck, **change))
    assert "trained with another architecture" in err and shown in err
    assert "finetune: true" in err
    assert preflight.resume_config_errors(cfg(load=ck, finetune=True, **change)) == []


def test_other_differences_are_listed(tmp_path: Path, caplog) -> None:
    ck = str(fake_checkpoint(tmp_path / "ck"))
    # A changed lr is applied only with override_lr_scheduler (refused otherwise: compat tests).
    new = cfg(
        load=ck,
        hidden_dropout=0.1,
        gradient_accumulation_steps=2,
        lr=1e-3,
        override_lr_scheduler=True,
    )
    with caplog.at_level(logging.INFO, logger="megatron"):
        assert preflight.resume_config_errors(new) == []
    assert "batch changed (training.gradient_accumulation_steps: 1 -> 2" in caplog.text
    assert "continues at the checkpoint's consumed_samples" in caplog.text
    for shown in ("model.hidden_dropout: 0.0 -> 0.1", "optimizer.lr: 0.0006 -> 0.001"):
        assert shown in caplog.text


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, shakespeare) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("resume_config")
    spec = {"save": str(tmp / "ck"), "train_iters": 8, "exit_interval": 4}
    run_cli(["train.py", str(write_config(tmp, shakespeare, "a.yml", **spec))])
    return tmp / "ck", spec


@pytest.mark.slow
def test_resume_with_other_heads_is_refused_before_training(
    tmp_path: Path, shakespeare, saved_run
) -> None:
    ck, spec = saved_run
    spec = {**spec, "load": str(ck), "exit_interval": None, "num_attention_heads": 8}
    with pytest.raises(AssertionError) as exc:
        run_cli(["train.py", str(write_config(tmp_path, shakespeare, **spec))])
    assert "model.num_attention_heads: 4 -> 8" in str(exc.value)
    assert (ck / "latest").read_text() == "global_step4"


@pytest.mark.slow
def test_changed_batch_resumes_at_consumed_samples(tmp_path: Path, shakespeare, saved_run) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(saved_run[0], ck)
    # Global batch 4 -> 2: iteration x new batch would restart at sample 8, re-reading 8..15.
    spec = {**saved_run[1], "save": str(ck), "load": str(ck), "exit_interval": None}
    out = run_cli(
        [
            "train.py",
            str(write_config(tmp_path, shakespeare, gradient_accumulation_steps=1, **spec)),
        ]
    )
    log = out.stdout + out.stderr
    assert re.search(r"resumed from \S+global_step4 at iteration 4, sample 16", log)
    assert "resume: batch changed" in log and "train_batch_size: 4 -> 2" in log
    state = json.loads((ck / "global_step8" / TRAINER_STATE).read_text())
    assert state["consumed_samples"] == 16 + 4 * 2
