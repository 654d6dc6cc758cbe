"""Checkpoint files are read without running code from them.

`torch.load(weights_only=False)` unpickles arbitrary objects, so a tampered `rng_rank0.pt` or
model-states file could run a command on resume. Every load here uses `weights_only=True`
with an explicit allowlist of the few non-tensor globals our files and DeepSpeed's
legitimately hold (numpy arrays in the RNG state; DeepSpeed's ZeRO stage enum, loss scaler and
fragment addresses in optimizer files). DeepSpeed's own loads go through `SafeCheckpointEngine`,
installed on the engine before `load_checkpoint`.

`allow_unsafe_checkpoint_load: true` (checkpoint section) is the explicit opt-in for files
from older versions that hold other objects: it loads with `weights_only=False` and warns.
Corrupted or truncated files raise `CheckpointLoadError` naming the file (torch's own message
names neither the file nor what to do).
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

import torch

log = logging.getLogger("megatron")

OPT_IN_KEY = "allow_unsafe_checkpoint_load"


class CheckpointLoadError(RuntimeError):
    """A checkpoint file was refused (unsafe content) or could not be read (corrupted)."""


def allowed_globals() -> list[Any]:
    """Exactly the non-tensor globals found in the files this trainer and DeepSpeed write
    (found with `torch.serialization.get_unsafe_globals_in_checkpoint`)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtypes = [type(np.dtype(t)) for t in ("uint32", "int64", "float32", "float64", "bool")]
    return [
        _reconstruct,
        scalar,
        np.ndarray,
        np.dtype,
        *dtypes,
        ZeroStageEnum,
        LossScaler,
        DynamicLossScaler,
        fragment_address,
    ]


_warned: set[str] = set()


def load_file(path: str | os.PathLike, *, allow_unsafe: bool = False, map_location: Any = None):
    """torch.load without code execution; errors name the file and the opt-in key."""
    path = os.fspath(path)
    if allow_unsafe:
        if path not in _warned:
            _warned.add(path)
            log.warning(
                "%s: true: unpickling %s with weights_only=False, which can run code stored in "
                "the file; only do this for checkpoints you trust",
                OPT_IN_KEY,
                path,
            )
        return _read(path, map_location, weights_only=False)
    with torch.serialization.safe_globals(allowed_globals()):
        return _read(path, map_location, weights_only=True)


def _read(path: str, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        found = _reason(str(exc))
        if not weights_only or "GLOBAL" not in found:
            raise CheckpointLoadError(
                f"checkpoint file {path} is corrupted or truncated and cannot be read: {found}"
            ) from exc
        raise CheckpointLoadError(
            f"refused to load checkpoint file {path}: it holds objects outside the allowed "
            f"tensors, numbers and allowlisted types, which could run code when unpickled "
            f"({found}). If it comes from a trusted older run, set {OPT_IN_KEY}: true in the "
            "checkpoint section (a warning is logged)."
        ) from exc
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointLoadError(
            f"checkpoint file {path} ({size:,} bytes) is corrupted or truncated and cannot be "
            f"read: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        ) from exc


def _reason(message: str) -> str:
    """The informative line of torch's weights_only error (the rest is generic advice)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line
    return lines[-1] if lines else "unreadable pickle"


def safe_checkpoint_engine(base: Any, allow_unsafe: bool) -> Any:
    """`base` (DeepSpeed's TorchCheckpointEngine) with its load going through load_file."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def __init__(self) -> None:  # keep base's settings (serialization, config)
            self.__dict__.update(base.__dict__)
            self.allow_unsafe = allow_unsafe

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_file(path, allow_unsafe=self.allow_unsafe, map_location=map_location)

    if not isinstance(base, TorchCheckpointEngine):
        raise CheckpointLoadError(
            f"DeepSpeed checkpoint engine {type(base).__name__} is not the torch engine; "
            "only the torch engine's loads are known to be safe here"
        )
    return SafeCheckpointEngine()


def install(engine: Any, allow_unsafe: bool) -> None:
    """Route the DeepSpeed engine's checkpoint loads (model, optimizer, pipeline layers)
    through load_file. Saving is unchanged (the same torch engine writes the same bytes)."""
    current = engine.checkpoint_engine
    if getattr(current, "allow_unsafe", None) == allow_unsafe:
        return
    engine.checkpoint_engine = safe_checkpoint_engine(current, allow_unsafe)
