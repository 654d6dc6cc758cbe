"""Dispatch and fallback on CPU: fused requested -> the reference (or the Triton interpreter
when the tests allow CPU tensors), one warning per kind of op; a failed build, a stale lock, a
lock held by a live builder and a wrong kernel all fall back without hanging."""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron import fused_kernels
from megatron.fused_kernels import compile_check, cuda_ext, dispatch, reference


def _fused_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("fused")
    ]


def _inputs() -> dict[str, Any]:
    torch.manual_seed(0)
    rot, seq = 4, 6
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.arange(seq).float()[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)
    x = torch.randn(2, seq, 3, 8).transpose(1, 2)  # [B, H, S, D] view, as the model passes
    h = torch.randn(2, seq, 16)
    return dict(x=x, cos=emb.cos(), sin=emb.sin(), h=h, w=torch.randn(16), b=torch.randn(16))


def _call_all(t: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        "rope": fused_kernels.rope(t["x"], t["cos"], t["sin"]),
        "layernorm": fused_kernels.layer_norm(t["h"], t["w"], t["b"], 1e-5),
        "rmsnorm": fused_kernels.rms_norm(t["h"], t["w"], 1e-5),
    }


def _reference_all(t: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        "rope": reference.rope(t["x"], t["cos"], t["sin"]),
        "layernorm": reference.layer_norm(t["h"], t["w"], t["b"], 1e-5),
        "rmsnorm": reference.rms_norm(t["h"], t["w"], 1e-5),
    }


def test_cpu_uses_the_reference_with_one_warning_per_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="megatron")
    t = _inputs()
    for _ in range(4):  # four layers, or four steps: still one warning per kind
        got, want = _call_all(t), _reference_all(t)
        assert all(torch.equal(got[k], want[k]) for k in want)  # bit-identical: the same code
    warnings = _fused_warnings(caplog)
    assert len(warnings) == 3
    for kind, message in zip(("rope", "layernorm", "rmsnorm"), warnings):
        assert message.startswith(f"fused {kind} requested")
        assert "PyTorch reference" in message and "input on cpu" in message
    assert fused_kernels.used == dict.fromkeys(fused_kernels.KINDS, "reference")


def test_triton_is_chosen_where_it_can_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("Triton is compiled for the GPU here (test_kernels runs it there)")
    caplog.set_level(logging.INFO, logger="megatron")
    monkeypatch.setattr(dispatch, "FUSED_DEVICES", ("cuda", "cpu"))  # the interpreter runs it
    t = _inputs()
    got, want = _call_all(t), _reference_all(t)
    for kind in want:
        torch.testing.assert_close(got[kind], want[kind], atol=1e-5, rtol=1e-5)
    assert fused_kernels.used == dict.fromkeys(fused_kernels.KINDS, "triton")
    assert not _fused_warnings(caplog)
    infos = [r.getMessage() for r in caplog.records if "using the triton" in r.getMessage()]
    assert len(infos) == 3 and all("cuda: ExtensionUnavailable" in m for m in infos)


def _pretend_gpu_without_triton(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CPU tensors count as fused-capable, CUDA 'exists', Triton is missing, builds go to
    tmp_path: the CUDA path up to the build runs for real."""
    monkeypatch.setattr(dispatch, "FUSED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(cuda_ext.torch.cuda, "is_available", lambda: True)

    def not_installed() -> None:
        raise ImportError("simulated: no prebuilt extension")

    monkeypatch.setattr(cuda_ext, "import_prebuilt", not_installed)

    def no_triton() -> None:
        raise ImportError("simulated: triton not installed")

    monkeypatch.setitem(dispatch._PROBES, "triton", no_triton)
    monkeypatch.setenv(cuda_ext.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(cuda_ext.JIT_ENV, raising=False)  # auto: builds, as Triton is missing


def test_build_failure_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _pretend_gpu_without_triton(monkeypatch, tmp_path)
    calls = []

    def failing_build(directory: str) -> None:
        calls.append(directory)
        raise RuntimeError("Error building extension: nvcc fatal (simulated)")

    monkeypatch.setattr(cuda_ext, "_torch_load", failing_build)
    t = _inputs()
    for _ in range(2):
        got, want = _call_all(t), _reference_all(t)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert calls == [str(tmp_path)]  # built once, the failure remembered
    warnings = _fused_warnings(caplog)
    assert len(warnings) == 3
    assert all("failed: RuntimeError: Error building extension" in m for m in warnings)
    assert all("simulated: triton not installed" in m for m in warnings)


def test_stale_torch_lock_is_removed_and_the_build_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    baton = tmp_path / cuda_ext.TORCH_BATON
    baton.write_text("")  # what a build killed half-way leaves; torch would wait for ever

    def build(directory: str) -> str:
        assert not baton.exists()
        return "module"

    t0 = time.monotonic()
    assert cuda_ext.jit_build(str(tmp_path), timeout_s=5, loader=build) == "module"
    assert time.monotonic() - t0 < 5
    assert any("removing stale build lock" in r.getMessage() for r in caplog.records)


def test_torch_still_names_its_lock_file_as_we_assume() -> None:
    from torch.utils import cpp_extension

    source = inspect.getsource(cpp_extension._jit_compile)
    assert f"FileBaton(os.path.join(build_directory, '{cuda_ext.TORCH_BATON}'))" in source


@pytest.fixture
def held_build_lock(tmp_path: Path) -> Any:
    """Another live process holding our build lock (a build still running elsewhere)."""
    code = (
        "import sys, time\n"
        "from megatron.common.files import file_lock\n"
        "with file_lock(sys.argv[1], 30):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(30)\n"
    )
    lock = str(tmp_path / cuda_ext.OUR_LOCK)
    proc = subprocess.Popen([sys.executable, "-c", code, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_lock_held_by_a_live_build_times_out_with_a_clear_message(
    held_build_lock: Any, tmp_path: Path
) -> None:
    def never(directory: str) -> None:
        raise AssertionError("built without the lock")

    t0 = time.monotonic()
    with pytest.raises(cuda_ext.ExtensionUnavailable, match="another process is still building"):
        cuda_ext.jit_build(str(tmp_path), timeout_s=0.5, loader=never)
    assert time.monotonic() - t0 < 5


def test_held_lock_falls_back_through_the_dispatch(
    held_build_lock: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _pretend_gpu_without_triton(monkeypatch, tmp_path)
    monkeypatch.setenv(cuda_ext.TIMEOUT_ENV, "0.5")
    t = _inputs()
    t0 = time.monotonic()
    assert torch.equal(fused_kernels.rope(t["x"], t["cos"], t["sin"]), _reference_all(t)["rope"])
    assert time.monotonic() - t0 < 10
    (warning,) = _fused_warnings(caplog)
    assert "still building" in warning and cuda_ext.TIMEOUT_ENV in warning


class _WrongKernels:
    """A 'compiled' backend that returns wrong numbers (a miscompiled kernel)."""

    def rope_apply(self, xs: torch.Tensor, cos: Any, sin: Any, backward: bool) -> torch.Tensor:
        return (xs * 2).contiguous()

    def norm_forward(self, x: torch.Tensor, w: Any, b: Any, eps: float, rms: bool, out: Any):
        rows = x.shape[0]
        return x.to(out) + 1, torch.zeros(rows), torch.ones(rows)

    def norm_backward(self, dy: torch.Tensor, x: Any, w: torch.Tensor, *a: Any, **k: Any):
        has_bias = a[-1]
        return dy.clone(), torch.zeros_like(w), torch.zeros_like(w) if has_bias else None


def test_kernel_failing_its_self_check_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(dispatch, "FUSED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setitem(dispatch._PROBES, "cuda", _WrongKernels)
    monkeypatch.setitem(dispatch._PROBES, "triton", lambda: 1 / 0)  # broken install
    t = _inputs()
    got, want = _call_all(t), _reference_all(t)
    assert all(torch.equal(got[k], want[k]) for k in want)
    warnings = _fused_warnings(caplog)
    assert len(warnings) == 3
    assert all("cuda: self-check against the reference failed" in m for m in warnings)
    assert all("triton: ZeroDivisionError" in m for m in warnings)


def test_cuda_extension_without_a_gpu_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(cuda_ext.ExtensionUnavailable, match="no CUDA device"):
        cuda_ext.load(allow_jit=True)


def test_jit_policy_and_build_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cuda_ext.JIT_ENV, raising=False)
    assert cuda_ext.jit_policy(triton_available=False) is True
    assert cuda_ext.jit_policy(triton_available=True) is False
    monkeypatch.setenv(cuda_ext.JIT_ENV, "1")
    assert cuda_ext.jit_policy(triton_available=True) is True
    monkeypatch.setenv(cuda_ext.JIT_ENV, "0")
    assert cuda_ext.jit_policy(triton_available=False) is False
    monkeypatch.delenv(cuda_ext.BUILD_DIR_ENV, raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/x/ext")
    assert cuda_ext.build_dir() == f"/x/ext/{cuda_ext.EXT_NAME}"
    monkeypatch.setenv(cuda_ext.BUILD_DIR_ENV, "/y")
    assert cuda_ext.build_dir() == "/y"


def test_compile_check_covers_every_source(tmp_path: Path) -> None:
    cmds = compile_check.commands("nvcc", "c++", "sm_90", tmp_path)
    compiled = sorted(Path(c[2]).name for c in cmds)
    sources = [p.name for p in compile_check.CSRC.iterdir() if p.suffix in (".cu", ".cpp")]
    assert compiled == sorted(sources)
    assert compiled == sorted(cuda_ext.SOURCES)  # the JIT build compiles the same files
    assert all("-c" in c for c in cmds)


def test_triton_kernels_compile_for_a_gpu() -> None:
    # The interpreter never runs Triton's compiler; compile every kernel variant ahead of
    # time for an H100 / H200 (sm_90) in a fresh process without TRITON_INTERPRET.
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "megatron.fused_kernels.compile_check", "--no-cuda"]
    proc = subprocess.run(
        [*cmd, "--triton-archs", "90"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kernel variants for sm_90 ok" in proc.stdout
