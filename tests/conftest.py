"""Shared fixtures: the bundled corpus built once per session into a temporary directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Fails any test that reads or writes checkpoints/, data/, runs/, hf/, ckpts/ or outputs/.
from tests.run_folder_guard.plugin import (  # noqa: F401
    _run_folders_untouched,
    pytest_configure,
    pytest_unconfigure,
)

ROOT = Path(__file__).resolve().parent.parent


# The smallest config the loader accepts, for tests of config handling that build no model.
MINIMAL_CONFIG = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 32,
    "train_micro_batch_size_per_gpu": 2,
    "train_iters": 10,
    "data_path": "data/x",
}


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(data prefix, tokenizer.json) of the bundled corpus, built with a small vocabulary."""
    from megatron.data.bundled import ensure_shakespeare

    root = tmp_path_factory.mktemp("shakespeare")
    return ensure_shakespeare(str(root), vocab_size=1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a repo entry point (train.py / deepy.py) in a fresh process; fail with its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args[:3])} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def write_config(tmp_path: Path, shakespeare: tuple[str, str], name: str = "c.yml", **kw) -> Path:
    prefix, tokenizer = shakespeare
    cfg = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "seq_length": 64,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_iters": 8,
        "lr": 2e-3,
        "warmup": 0.25,
        "min_lr": 1e-4,
        "hidden_dropout": 0.1,  # makes the result depend on the restored RNG state
        "data_path": prefix,
        "vocab_file": tokenizer,
        "tokenizer_type": "HFTokenizer",
        "split": "900,100,0",
        "log_interval": 1,
        "eval_interval": 4,
        "eval_iters": 2,
        "checkpoint_factor": 4,
        "seed": 7,
        "master_port": free_port(),
        "metrics_jsonl": str(tmp_path / f"{name}.jsonl"),
        **kw,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def step_losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r["train/step_loss"] for r in rows if "train/step_loss" in r}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Belt and braces: DeepSpeed's CPU shm comm op (disabled in init_distributed) leaves a
    /dev/shm buffer per rank and port (tens of MB each); remove any so runs never pile up."""
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        path.unlink(missing_ok=True)
