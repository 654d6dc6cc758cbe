"""Build the fused-kernel CUDA extension ahead of time (module `sepneox_fused_kernels_cuda`).

    python megatron/fused_kernels/setup.py install     # the seed's command, from the repo root
    pip install ./megatron/fused_kernels                # the same through pip (see pyproject.toml)

Needs a CUDA toolkit (nvcc, CUDA_HOME) matching torch's CUDA. Architectures: $TORCH_CUDA_ARCH_LIST
(default: this machine's GPU, else 8.0 and 9.0). Without the extension the model uses Triton or
the PyTorch reference and says so in its log: building it is optional.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "sepneox_fused_kernels_cuda"  # keep in sync with cuda_ext.EXT_NAME
SOURCES = ["csrc/fused_kernels.cpp", "csrc/rope.cu", "csrc/norms.cu"]


def _extension() -> object:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        sys.exit("fused kernels: building needs torch installed (pip --no-build-isolation)")
    if CUDA_HOME is None:
        sys.exit(
            "fused kernels: no CUDA toolkit (nvcc / CUDA_HOME) found; nothing to build. "
            "Runs use Triton or the PyTorch reference instead."
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # A100, H100 / H200
    return CUDAExtension(EXT_NAME, SOURCES, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})


def main() -> None:
    os.chdir(HERE)  # sources are relative to this file, wherever the command runs from
    ext = _extension()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="sepneox-fused-kernels",
        version="0.1.0",
        description="Fused RoPE and LayerNorm / RMSNorm CUDA kernels for SepNeoX",
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension},
        py_modules=[],
        packages=[],
    )


if __name__ == "__main__":
    main()
