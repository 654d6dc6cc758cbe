"""The host-allocator tuning is applied on glibc Linux and can be switched off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from megatron.training.host_memory import tune_host_allocator as t; print(t(), t())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("SEPNEOX_MALLOC_TUNING", None)
    if env_value is not None:
        env["SEPNEOX_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_applies_once_and_can_be_disabled() -> None:
    assert _run(None) == "True True"  # applied; the second call reports the same state
    assert _run("0") == "False False"
