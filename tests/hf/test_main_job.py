"""The main job's model (configs/tiny.yml: Pythia style, 4 x 256, partial rotary, parallel
residual, tied head) converts, and the transformers model reproduces the validation loss the
trainer logged, on the same validation batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_neox_to_hf import convert, parse_args
from transformers import AutoModelForCausalLM

from megatron.checkpoint import open_checkpoint
from megatron.config.validate import finalize
from megatron.data.builder import build_train_valid_test_datasets
from megatron.data.tokenizers import build_tokenizer
from megatron.training.setup import sample_counts
from tests.conftest import run_cli


def _validation_loss(model: torch.nn.Module, ckpt: Path) -> float:
    """The trainer's first evaluation: validation samples from 0, in micro-batches."""
    cfg = open_checkpoint(ckpt).cfg
    finalize(cfg, 1, build_tokenizer(cfg.data).vocab_size)
    _, valid, _ = build_train_valid_test_datasets(
        cfg.data, cfg.model.seq_length, cfg.training.seed, sample_counts(cfg)
    )
    d, losses = cfg.derived, []
    for b in range(cfg.logging.eval_iters * d.grad_accum):
        rows = range(b * d.micro_batch, (b + 1) * d.micro_batch)
        tokens = torch.stack([torch.as_tensor(valid[i]["text"], dtype=torch.long) for i in rows])
        with torch.no_grad():
            logits = model(tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        losses.append(loss)
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_main_job_checkpoint_reproduces_its_validation_loss(
    shakespeare: tuple[str, str], tmp_path: Path
) -> None:
    jsonl = tmp_path / "metrics.jsonl"
    sets = {
        "train_iters": 2, "eval_interval": 2, "eval_iters": 1, "checkpoint_factor": 2,
        "train_micro_batch_size_per_gpu": 4,
        "save": tmp_path / "ckpt", "load": tmp_path / "ckpt",  # not tiny.yml's checkpoints/tiny
        "data_path": shakespeare[0], "vocab_file": shakespeare[1], "prepare_data": "none",
        "metrics_jsonl": jsonl, "log_interval": 1,
    }  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    run_cli(["train.py", "configs/tiny.yml", *args])
    out = convert(
        parse_args(["--input_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "hf")])
    )
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert hf.config.num_hidden_layers == 4 and hf.config.hidden_size == 256
    logged = [json.loads(r)["valid/loss"] for r in jsonl.read_text().splitlines() if "valid/" in r]
    assert _validation_loss(hf, tmp_path / "ckpt") == pytest.approx(logged[-1], abs=1e-4)
