"""Keep freed host memory in the process instead of returning it to the kernel (glibc).

By default glibc serves allocations above a (dynamic) threshold with fresh mmap()s and returns
freed memory at the top of the heap to the kernel. A training step allocates and frees the same
tens-of-megabyte activation and gradient buffers every layer, so each step pays page faults and
kernel zeroing for them again: on the 2-core reference VM this was ~14% of a SepLLM attention
step (benchmarks/sepllm_attention.py, docs/benchmarks.md). PyTorch's CPU tuning guide suggests
jemalloc / tcmalloc for the same reason; this is the dependency-free glibc version, applied with
mallopt at start-up. Set SEPNEOX_MALLOC_TUNING=0 to keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit: larger requests still mmap
_TRIM_THRESHOLD = 8 * 1024**3  # only give memory back beyond 8 GiB free at the heap top
_TOP_PAD = 64 * 1024 * 1024  # grow the heap in 64 MiB steps

_applied: bool | None = None


def tune_host_allocator() -> bool:
    """Apply the settings once per process; True when they are in effect (glibc Linux)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("SEPNEOX_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )
    if not ok:
        log.warning("mallopt refused the host-allocator settings; keeping glibc defaults")
    _applied = ok
    return ok
