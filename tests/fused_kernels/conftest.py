"""Fused-kernel tests run the Triton kernels under the CPU interpreter: the variable must be set
before `triton.jit` decorates them (when megatron.fused_kernels.triton_kernels is imported)."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megatron import fused_kernels  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dispatch() -> Iterator[None]:
    """Each test sees unprobed backends and no earlier announcements, in any order."""
    fused_kernels.reset()
    yield
    fused_kernels.reset()
