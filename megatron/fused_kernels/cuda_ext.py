"""The CUDA extension: import it prebuilt, or build it just in time under a lock with a deadline.

Prebuilt: `python megatron/fused_kernels/setup.py install` or `pip install
./megatron/fused_kernels` installs the module `sepneox_fused_kernels_cuda`.

Just in time: `torch.utils.cpp_extension.load` into `build_dir()`. torch guards that directory
with a `lock` file (its FileBaton) and waits forever for it to go away, so a build killed
half-way hangs every later run (GPT-NeoX issues #544, #801). We take our own `flock` with a
deadline first (`megatron.common.files.file_lock`, released by the kernel when its holder dies):
whoever holds it is the only builder, so a torch `lock` file found while holding it is stale and
is removed. A live build held longer than the deadline ends the wait with a clear error and the
caller falls back to another implementation.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from megatron.common.files import LockTimeout, file_lock

log = logging.getLogger("megatron")

EXT_NAME = "sepneox_fused_kernels_cuda"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("fused_kernels.cpp", "rope.cu", "norms.cu")
NVCC_FLAGS = ["-O3"]
TORCH_BATON = "lock"  # the file torch.utils.cpp_extension's FileBaton creates in the build dir
OUR_LOCK = "sepneox-build.lock"
JIT_ENV, BUILD_DIR_ENV, TIMEOUT_ENV = (
    "SEPNEOX_FUSED_JIT",
    "SEPNEOX_FUSED_BUILD_DIR",
    "SEPNEOX_FUSED_LOCK_TIMEOUT",
)


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension can be neither imported nor built; the message says why."""


def build_dir() -> str:
    """$SEPNEOX_FUSED_BUILD_DIR, else <$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions>/ext."""
    if os.environ.get(BUILD_DIR_ENV):
        return os.environ[BUILD_DIR_ENV]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    return os.path.join(root, EXT_NAME)


def lock_timeout_s() -> float:
    """How long to wait for another process's build ($SEPNEOX_FUSED_LOCK_TIMEOUT, default 600 s:
    a cold build of these sources takes one to two minutes)."""
    return float(os.environ.get(TIMEOUT_ENV, "600"))


def jit_policy(triton_available: bool) -> bool:
    """Build just in time? $SEPNEOX_FUSED_JIT=1 always, 0 never; unset: only when Triton is
    missing (Triton needs no build, so a first run need not spend minutes compiling)."""
    value = os.environ.get(JIT_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1"
    return not triton_available


def import_prebuilt() -> ModuleType:
    return importlib.import_module(EXT_NAME)


def _torch_load(directory: str) -> ModuleType:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise ExtensionUnavailable("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    return cpp_extension.load(
        name=EXT_NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=directory,
        verbose=False,
    )


def _clear_stale_baton(directory: str) -> None:
    baton = os.path.join(directory, TORCH_BATON)
    if os.path.exists(baton):
        log.warning(
            "fused kernels: removing stale build lock %s (left by a build that did not finish; "
            "no other build holds %s)",
            baton,
            os.path.join(directory, OUR_LOCK),
        )
        os.remove(baton)


def jit_build(
    directory: str | None = None,
    timeout_s: float | None = None,
    loader: Callable[[str], Any] | None = None,
) -> Any:
    """Build (or load the cached build of) the extension in `directory` under our lock.

    `loader(directory)` does the build (torch's `load` by default; tests pass a fake one).
    Raises `ExtensionUnavailable` on a lock timeout or any build error, never hangs longer
    than `timeout_s` waiting for another builder."""
    directory = directory or build_dir()
    timeout_s = lock_timeout_s() if timeout_s is None else timeout_s
    try:
        os.makedirs(directory, exist_ok=True)
        with file_lock(os.path.join(directory, OUR_LOCK), timeout_s):
            _clear_stale_baton(directory)
            return (loader or _torch_load)(directory)
    except LockTimeout as e:
        raise ExtensionUnavailable(
            f"another process is still building in {directory} ({e}); set {TIMEOUT_ENV} to wait "
            f"longer or {BUILD_DIR_ENV} to build elsewhere"
        ) from e
    except ExtensionUnavailable:
        raise
    except Exception as e:  # a compiler error, a missing header: the run goes on without it
        raise ExtensionUnavailable(f"build in {directory} failed: {type(e).__name__}: {e}") from e


def load(allow_jit: bool) -> Any:
    """The extension module: prebuilt if installed, else built just in time if allowed."""
    if not torch.cuda.is_available():
        raise ExtensionUnavailable("no CUDA device")
    try:
        return import_prebuilt()
    except ImportError as e:
        if not allow_jit:
            raise ExtensionUnavailable(
                f"not installed ({e}); build it with `pip install ./megatron/fused_kernels` "
                f"or set {JIT_ENV}=1 to build it just in time"
            ) from e
    return jit_build()


class CudaKernels:
    """Adapts the extension to the kernel interface of `functions.py`."""

    def __init__(self, ext: Any) -> None:
        self.ext = ext

    def rope_apply(
        self, xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
    ) -> torch.Tensor:
        return self.ext.rope_apply(xs, cos, sin, backward)

    def norm_forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        eps: float,
        rms: bool,
        out_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, mean, rstd = self.ext.norm_forward(x.contiguous(), w, b, eps, rms)
        return y.to(out_dtype), mean, rstd

    def norm_backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        rms: bool,
        has_bias: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dy = dy.to(x.dtype).contiguous()
        dx, dw, db = self.ext.norm_backward(dy, x.contiguous(), w, mean, rstd, rms, has_bias)
        return dx, dw, db
