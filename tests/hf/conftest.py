"""Checkpoints written by short real training runs, shared by the conversion tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron.data.tokenizers import tokenizer_for_file
from megatron.sepllm.separators import separator_ids
from tests.conftest import ROOT, run_cli, write_config

# The tests call the conversion CLIs (tools/ckpts/*.py, thin over megatron/hf) by their main.
sys.path.insert(0, str(ROOT / "tools" / "ckpts"))

# Pythia-style tiny model: partial rotary, parallel residual, tied head; SepLLM attention
# with a small window so the kept set differs from causal at S=64.
MODEL = dict(rotary_pct=0.25, gpt_j_residual=True, hidden_dropout=0.0)


def sepllm_overrides(tokenizer: str, mode: str = "sepllm") -> dict:
    seps = separator_ids(tokenizer_for_file(tokenizer)) if mode == "sepllm" else []
    return {
        "sepllm": {
            "mode": mode,
            "separator_token_ids": seps,
            "init_tokens": 2,
            "local_window": 8,
            "local_window_per_layer": [8, 64],
            "pad_token_id": 1,
        }
    }


def train_tiny(tmp: Path, shakespeare: tuple[str, str], **kw: object) -> Path:
    """Two optimizer steps with one evaluation and a checkpoint at the end; returns save dir."""
    save = tmp / "ckpt"
    cfg = write_config(
        tmp,
        shakespeare,
        train_iters=2,
        checkpoint_factor=2,
        eval_interval=2,
        eval_iters=1,
        save=str(save),
        **{**MODEL, **kw},
    )
    run_cli(["train.py", str(cfg)])
    return save


@pytest.fixture(scope="session")
def sepllm_ckpt(tmp_path_factory: pytest.TempPathFactory, shakespeare: tuple[str, str]) -> Path:
    tmp = tmp_path_factory.mktemp("sepllm_run")
    return train_tiny(tmp, shakespeare, **sepllm_overrides(shakespeare[1]))


@pytest.fixture(scope="session")
def exported(sepllm_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SepLLM checkpoint converted by the command line, as a user runs it."""
    out = tmp_path_factory.mktemp("export") / "hf"
    args = ["--input_dir", str(sepllm_ckpt), "--output_dir", str(out)]
    run_cli(["tools/ckpts/convert_neox_to_hf.py", *args])
    return out
