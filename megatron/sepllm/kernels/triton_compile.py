"""Compile the Triton SepLLM kernel for a GPU without one (sm_80 / sm_90 cubins).

    python -m megatron.sepllm.kernels.triton_compile [--archs 80 90] [--dtypes bf16 fp16 fp32]
        [--head-dims 64 128]

The CPU interpreter the tests use never runs Triton's compiler, so a kernel that passes them
can still fail to build for a real GPU (unsupported ops, dot shapes, register layouts). This
compiles every launch variant of kernels/triton_sep.py ahead of time (Triton ships its own
ptxas) with the launch constants the kernel uses. It is the SepLLM twin of
`python -m megatron.fused_kernels.compile_check`, which cannot import this package (the
package DAG in docs/architecture.md: fused_kernels imports only common). Exit status is
non-zero on any compiler error. Must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron.sepllm.kernels import triton_sep

# Pointer arguments that are always fp32 / int32, whatever the inputs' dtype.
_FP32_PTRS = ("lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr")
_I32_PTRS = ("far_ptr", "cnt_ptr")
_FLOATS = ("qk_scale", "sm_scale")
KERNELS = {
    "fwd": (triton_sep._fwd_kernel, {}),
    "dq": (triton_sep._dq_kernel, {}),
    "dkv-window": (triton_sep._dkv_kernel, {"FAR": False}),
    "dkv-far": (triton_sep._dkv_kernel, {"FAR": True}),
}


def _signature(fn, dtype: str, consts: dict[str, object]) -> dict[str, str]:
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in _FP32_PTRS:
            sig[arg] = "*fp32"
        elif arg in _I32_PTRS:
            sig[arg] = "*i32"
        elif arg.endswith("_ptr"):
            sig[arg] = f"*{dtype}"
        else:
            sig[arg] = "fp32" if arg in _FLOATS else "i32"
    return sig


def compile_variant(name: str, dtype: str, head_dim: int, arch: int) -> None:
    """Compile one kernel for one dtype / head dim / compute capability (raises on error)."""
    fn, extra = KERNELS[name]
    consts: dict[str, object] = dict(
        BLOCK_M=triton_sep.BLOCK_M,
        BLOCK_N=triton_sep.BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PREC="ieee" if dtype == "fp32" else "tf32",
        UPCAST=False,  # the interpreter's workaround; GPUs multiply in the inputs' dtype
        **extra,
    )
    src = ASTSource(
        fn,
        _signature(fn, dtype, consts),
        {(fn.arg_names.index(k),): v for k, v in consts.items()},
    )
    options = dict(num_warps=triton_sep.NUM_WARPS, num_stages=triton_sep.NUM_STAGES)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def check(archs: list[int], dtypes: list[str], head_dims: list[int]) -> list[str]:
    """Compile every variant in a fresh Triton cache; the failures (empty: all built)."""
    failures = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # really compiled, not found in a cache
        for arch in archs:
            for dtype in dtypes:
                for d in head_dims:
                    for name in KERNELS:
                        try:
                            compile_variant(name, dtype, d, arch)
                        except Exception as e:  # report every failing variant
                            failures.append(f"{name} sm_{arch} {dtype} D={d}: {str(e)[-800:]}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_compile: TRITON_INTERPRET=1 makes the kernels interpreted; unset it")
        return 1
    t0 = time.monotonic()
    failures = check(args.archs, args.dtypes, args.head_dims)
    for f in failures:
        print(f"triton_compile: {f}")
    n = len(args.archs) * len(args.dtypes) * len(args.head_dims) * len(KERNELS)
    where = " / ".join(f"sm_{a}" for a in args.archs)
    state = "FAILED" if failures else "ok"
    print(
        f"triton_compile: {n} sepllm kernel variants for {where} {state} "
        f"({time.monotonic() - t0:.1f}s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
