"""Without a GPU the fused-kernel tests run the Triton kernels under the CPU interpreter.
Triton reads TRITON_INTERPRET when `triton.jit` decorates a kernel and again when one runs,
so it is set while megatron.fused_kernels.triton_kernels is imported (before any test module
imports it) and during each test here; the rest of the suite keeps the environment it had.
On a GPU machine the kernels are compiled and run on the GPU instead."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from megatron import fused_kernels


def _import_interpreted() -> None:
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with contextlib.suppress(ImportError):  # no Triton: its tests skip themselves
            import megatron.fused_kernels.triton_kernels  # noqa: F401
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    _import_interpreted()


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees unprobed backends and no earlier announcements, in any order."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_kernels.reset()
    yield
    fused_kernels.reset()
