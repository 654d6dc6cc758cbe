"""Compile the CUDA sources (no link, no GPU) against the installed torch headers.

    python -m megatron.fused_kernels.compile_check [--arch sm_90] [--out DIR]

CI runs this where `nvcc` exists: it proves the .cu / .cpp files build with this torch, without
a GPU and without the full extension build (no cuBLAS / cuSPARSE headers needed). Exit status
is non-zero on a compiler error; without nvcc it says so and exits 0 (nothing to check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parent / "csrc"
EXT_NAME = "sepneox_fused_kernels_cuda"
# torch's own extension flags: half / bfloat16 operators come from c10, not cuda_fp16.h.
NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-O0",  # a check, not a build: the host compiler's optimiser is most of the time
]


def _common_flags() -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        *(f"-I{p}" for p in includes),
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-DTORCH_EXTENSION_NAME={EXT_NAME}",
        "-std=c++17",
    ]


# A CPU-only torch wheel ships the c10/cuda headers but not this one CMake-generated header of
# its CUDA build; its whole content there is this define (c10 is a shared library).
CUDA_CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


def _shim_includes(out: Path) -> list[str]:
    """`-I` for a stand-in of the generated header when the installed torch lacks it."""
    if any((Path(p) / CUDA_CMAKE_MACROS).exists() for p in cpp_extension.include_paths()):
        return []
    shim = out / "shim"
    (shim / CUDA_CMAKE_MACROS).parent.mkdir(parents=True, exist_ok=True)
    (shim / CUDA_CMAKE_MACROS).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    print(f"compile_check: this torch has no {CUDA_CMAKE_MACROS} (CPU build); using a stand-in")
    return [f"-I{shim}"]


def _cuda_include(nvcc: str) -> list[str]:
    """The toolkit's include directory (nvcc may be a wrapper script outside the toolkit)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    homes += [str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return [str(Path(home) / "include")]
    return []


def commands(nvcc: str, cxx: str, arch: str, out: Path) -> list[list[str]]:
    """One compile-only command per source file."""
    flags = _common_flags() + _shim_includes(out)
    cmds = []
    for src in sorted(CSRC.glob("*.cu")):
        obj = out / (src.stem + ".cu.o")
        cmds.append([nvcc, "-c", str(src), "-o", str(obj), f"-arch={arch}", *NVCC_FLAGS, *flags])
        cmds[-1] += ["-Xcompiler", "-fPIC"]
    # The bindings include c10/cuda headers, which include the CUDA runtime's.
    cuda_inc = [f"-I{d}" for d in _cuda_include(nvcc)]
    for src in sorted(CSRC.glob("*.cpp")):
        obj = out / (src.stem + ".o")
        cmds.append([cxx, "-c", str(src), "-o", str(obj), "-O0", "-fPIC", *flags, *cuda_inc])
    return cmds


def _compile(cmd: list[str]) -> tuple[str, bool, float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report = f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    return Path(cmd[2]).name, proc.returncode == 0, time.monotonic() - t0, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", default="sm_90", help="one GPU architecture to compile for")
    parser.add_argument("--out", default=None, help="object directory (default: a temp dir)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc") or (
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    )
    if not nvcc or not os.path.exists(nvcc):
        print("compile_check: no nvcc on PATH or CUDA_HOME; nothing to compile")
        return 0
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        # The files are independent: compile them side by side (header parsing dominates).
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(_compile, commands(nvcc, cxx, args.arch, out)))
    for name, ok, seconds, report in results:
        print(f"compile_check: {name} {'ok' if ok else 'FAILED'} ({seconds:.1f}s)")
        if not ok:
            print(report)
    if not all(ok for _, ok, _, _ in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
