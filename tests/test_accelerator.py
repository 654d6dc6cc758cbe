"""pin_cpu_accelerator: DeepSpeed picks the same accelerator, without its "If you have GPU"
warning, in the processes the entry points start."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from megatron.common.accelerator import pin_cpu_accelerator

PROBE = "from deepspeed.accelerator import get_accelerator; print(get_accelerator()._name)"


def _deepspeed_choice(env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1], out.stdout + out.stderr


def test_pinned_choice_is_deepspeeds_own_without_the_warning() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    detected, detected_log = _deepspeed_choice(env)
    pinned = dict(env)
    was_set = pin_cpu_accelerator(pinned)
    if was_set:  # only where DeepSpeed falls back to the CPU
        assert detected == "cpu"
    if not torch.cuda.is_available():
        assert was_set and "If you have GPU" in detected_log
    choice, log = _deepspeed_choice(pinned)
    assert choice == detected
    assert "If you have GPU" not in log


def test_an_explicit_choice_is_kept() -> None:
    env = {"DS_ACCELERATOR": "cuda"}
    assert not pin_cpu_accelerator(env)
    assert env == {"DS_ACCELERATOR": "cuda"}
