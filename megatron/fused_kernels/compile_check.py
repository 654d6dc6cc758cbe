"""Compile the fused kernels for a GPU without one: the CUDA sources and the Triton kernels.

    python -m megatron.fused_kernels.compile_check [--arch sm_90] [--out DIR] [--no-cuda]
        [--no-triton] [--triton-archs 80 90]

CUDA: each .cu / .cpp file is compiled (no link) with `nvcc` against the installed torch's
headers: it proves the sources build with this torch, without the full extension build (no
cuBLAS / cuSPARSE headers needed). Triton: each kernel variant the model launches is compiled
ahead of time down to a cubin for sm_80 and sm_90 (Triton ships its own ptxas), which the CPU
interpreter the tests use never does. Exit status is non-zero on a compiler error; without
nvcc or Triton that part says so and is skipped.
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


def _triton_variants() -> list[tuple[str, dict[str, str], dict[str, object]]]:
    """(kernel, signature, constexprs) for each code path: rotary forward / backward with and
    without pass-through dims, LayerNorm with and without bias, RMSNorm; bf16 and fp32."""
    variants = []
    for dt in ("bf16", "fp32"):
        for backward, pas in ((False, 48), (True, 48), (False, 0)):
            rope = dict(HALF=8, PASS=pas, BLOCK_H=16, BLOCK_HALF=8, BLOCK_PASS=64 if pas else 1)
            variants.append(("_rope_kernel", {"*": dt}, {**rope, "BACKWARD": backward}))
        for rms, bias in ((False, True), (False, False), (True, False)):
            norm = dict(RMS=rms, HAS_BIAS=bias, BLOCK_N=1024)
            variants.append(("_norm_fwd_kernel", {"*": dt}, norm))
            variants.append(("_norm_bwd_kernel", {"*": dt}, norm))
    return variants


_FP32_BUFFERS = ("mean_ptr", "rstd_ptr", "dw_ptr", "db_ptr")


def triton_check(archs: tuple[int, ...] = (80, 90)) -> list[str]:
    """Compile every Triton variant for each architecture; the failures (empty: all built)."""
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as cache:
        # A fresh cache: every variant is really compiled, not found from an earlier run.
        os.environ["TRITON_CACHE_DIR"], before = cache, os.environ.get("TRITON_CACHE_DIR")
        try:
            for variant in _triton_variants():
                failures += _compile_triton(*variant, archs)
        finally:
            if before is None:
                del os.environ["TRITON_CACHE_DIR"]
            else:
                os.environ["TRITON_CACHE_DIR"] = before
    return failures


def _compile_triton(
    name: str, dtypes: dict[str, str], constexprs: dict[str, object], archs: tuple[int, ...]
) -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron.fused_kernels import triton_kernels

    failures = []
    fn = getattr(triton_kernels, name)
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = "*fp32" if arg in _FP32_BUFFERS else f"*{dtypes['*']}"
        else:
            sig[arg] = "fp32" if arg == "eps" else "i32"
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    for arch in archs:
        try:
            triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32))
        except Exception as e:  # report every failing variant, not just the first
            failures.append(f"{name} sm_{arch} {dtypes['*']} {constexprs}: {str(e)[-800:]}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", default="sm_90", help="one GPU architecture to compile for")
    parser.add_argument("--out", default=None, help="object directory (default: a temp dir)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument(
        "--triton-archs", type=int, nargs="+", default=[80, 90], help="compute capabilities"
    )
    args = parser.parse_args(argv)
    ok = True
    if not args.no_triton:
        ok &= _report_triton(tuple(args.triton_archs))
    if not args.no_cuda:
        ok &= _report_cuda(args)
    return 0 if ok else 1


def _report_triton(archs: tuple[int, ...]) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: TRITON_INTERPRET=1 makes the kernels interpreted; unset it")
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile_check: Triton not installed; Triton kernels not checked")
        return True
    t0 = time.monotonic()
    failures = triton_check(archs)
    for f in failures:
        print(f"compile_check: triton {f}")
    n, where = len(_triton_variants()) * len(archs), " / ".join(f"sm_{a}" for a in archs)
    state = "FAILED" if failures else "ok"
    seconds = time.monotonic() - t0
    print(f"compile_check: triton {n} kernel variants for {where} {state} ({seconds:.1f}s)")
    return not failures


def _report_cuda(args: argparse.Namespace) -> bool:
    nvcc = shutil.which("nvcc") or (
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    )
    if not nvcc or not os.path.exists(nvcc):
        print("compile_check: no nvcc on PATH or CUDA_HOME; CUDA sources not compiled")
        return True
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
    return all(ok for _, ok, _, _ in results)


if __name__ == "__main__":
    sys.exit(main())
