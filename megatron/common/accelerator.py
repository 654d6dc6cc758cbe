"""DeepSpeed's accelerator choice made explicit on a host that has no accelerator.

DeepSpeed falls back to its CPU accelerator when it detects none, and warns "Setting
accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it" in
every process that imports it: deepy.py, DeepSpeed's launcher and each rank (three times per
CPU run). Where it would fall back anyway, the entry points say "cpu" through DS_ACCELERATOR,
DeepSpeed's own override, which the processes they start inherit: the same choice, no warning.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping

# Packages through which DeepSpeed detects an accelerator other than CUDA / XPU / MPS
# (deepspeed/accelerator/real_accelerator.py): with any of them installed, it decides.
OTHER_ACCELERATOR_PACKAGES = (
    "intel_extension_for_pytorch",
    "torch_npu",
    "torch_sdaa",
    "habana_frameworks",
    "torch_mlu",
    "torch_supa",
    "torch_xmlir",
)


def pin_cpu_accelerator(env: MutableMapping[str, str] = os.environ) -> bool:
    """Set DS_ACCELERATOR=cpu in `env` (an entry point's own environment by default) when
    DeepSpeed would pick its CPU accelerator anyway (not set already, no CUDA / XPU / MPS
    device, no other accelerator's package). Returns whether it was set."""
    import torch

    if "DS_ACCELERATOR" in env:
        return False
    xpu = getattr(torch, "xpu", None)
    if (
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or torch.backends.mps.is_available()
        or any(importlib.util.find_spec(p) for p in OTHER_ACCELERATOR_PACKAGES)
    ):
        return False
    env["DS_ACCELERATOR"] = "cpu"
    return True
