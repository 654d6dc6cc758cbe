"""Index helpers: a pybind11 C++ extension compiled on first use, with a numpy fallback.

The extension is built into a per-user cache directory keyed by the source hash and Python
ABI, under a file lock with a deadline (a stale lock or a hung compiler never blocks training:
we fall back to numpy, which produces identical arrays). ``SEPNEOX_DATA_HELPERS=numpy`` forces
the fallback; ``SEPNEOX_CACHE`` moves the cache.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import subprocess
import sys
import sysconfig
from types import ModuleType

import numpy as np

from megatron.common.files import atomic_path, file_lock

log = logging.getLogger(__name__)

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers.cpp")
_MODULE = "sepneox_data_helpers"
_LOCK_TIMEOUT_S = 180.0
_COMPILE_TIMEOUT_S = 170.0
_cached: ModuleType | None = None
_tried = False


def cache_dir() -> str:
    root = os.environ.get("SEPNEOX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "sepneox"
    )
    with open(_SRC, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return os.path.join(root, "data_helpers", f"{sys.implementation.cache_tag}-{digest}")


def _load(path: str) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_MODULE, path)
    spec = importlib.util.spec_from_file_location(_MODULE, path, loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _compile(out: str) -> None:
    import pybind11

    with atomic_path(out) as tmp:  # another process never sees a half-written .so
        cmd = [
            os.environ.get("CXX", "c++"),
            "-O3",
            "-shared",
            "-std=c++17",
            "-fPIC",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            _SRC,
            "-o",
            tmp,
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=_COMPILE_TIMEOUT_S)


def get_extension() -> ModuleType | None:
    """The compiled helpers, or None (numpy fallback) if disabled or unbuildable."""
    global _cached, _tried
    if _tried:
        return _cached
    _tried = True
    if os.environ.get("SEPNEOX_DATA_HELPERS", "").lower() == "numpy":
        return None
    try:
        d = cache_dir()
        os.makedirs(d, exist_ok=True)
        so = os.path.join(d, _MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        if not os.path.exists(so):
            with file_lock(os.path.join(d, "build.lock"), _LOCK_TIMEOUT_S):
                if not os.path.exists(so):
                    _compile(so)
        _cached = _load(so)
    except Exception as e:  # any build failure means: use numpy
        detail = getattr(e, "stderr", b"") or b""
        log.warning(
            "data helpers: C++ build unavailable (%s %s); using the numpy fallback",
            e,
            detail.decode(errors="replace")[-500:],
        )
        _cached = None
    return _cached


def build_sample_idx_numpy(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """Vectorised equivalent of the C++ loop: sample k starts at packed token k * seq_length,
    placed in the (non-empty) document that contains that token."""
    lengths = sizes[doc_idx].astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if num_samples * seq_length + 1 > total:
        raise RuntimeError(
            f"build_sample_idx: documents exhausted ({total} tokens < "
            f"{num_samples} samples * {seq_length} + 1)"
        )
    pos = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    which = np.searchsorted(ends, pos, side="right")
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    out[1:, 0] = which
    out[1:, 1] = pos - (ends[which] - lengths[which])
    return out


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Same greedy rule and float arithmetic as the C++ (plain Python floats are doubles)."""
    w = [float(x) for x in weights]
    current = [0] * len(w)
    di = np.empty(size, np.int64)
    dsi = np.empty(size, np.int64)
    for i in range(size):
        denom = float(i) if i > 1 else 1.0
        best, best_err = 0, w[0] * denom - current[0]
        for d in range(1, len(w)):
            err = w[d] * denom - current[d]
            if err > best_err:
                best, best_err = d, err
        di[i] = best
        dsi[i] = current[best]
        current[best] += 1
    return di, dsi


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    ext = get_extension()
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    doc_idx = np.ascontiguousarray(doc_idx, dtype=np.int64)
    if ext is None:
        return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_samples)
    return ext.build_sample_idx(sizes, doc_idx, int(seq_length), int(num_samples))


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    ext = get_extension()
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if ext is None:
        return build_blending_indices_numpy(weights, size)
    return ext.build_blending_indices(weights, int(size))
