"""The Triton SepLLM kernel against the independent fp64 reference (loop-built kept mask,
plain masked softmax): outputs and dq / dk / dv.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
when `triton.jit` decorates them (module import) and when they run, so it is set while
kernels/triton_sep.py is imported here and during each test (the rest of the suite keeps its
environment). With a GPU the same cases run compiled on CUDA. Shapes are tiny: the
interpreter runs every program as numpy ops.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator

import pytest
import torch

from megatron.config.schema import SepLLMConfig
from megatron.sepllm.info import build_kept_set
from megatron.sepllm.kernels import get_kernel
from tests.sepllm.test_kernels import (
    PAD,
    SEP,
    case_config,
    make_ids,
    reference_attention,
    reference_keep,
)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def _import_kernel_module():
    """kernels/triton_sep.py with its kernels interpreted when there is no GPU (re-imported if
    something imported it before without the interpreter). Triton's own library functions
    (tl.zeros, ...) are decorated when triton is first imported, so that import must see the
    variable too (tests/fused_kernels/conftest.py does the same for the whole suite)."""
    before = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        imported = sys.modules.get("triton")
        if imported is not None and type(imported.language.zeros).__name__ == "JITFunction":
            raise RuntimeError(
                "triton was imported without TRITON_INTERPRET=1 before this module: its "
                "library functions cannot run in the CPU interpreter; run the file on its own"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        from megatron.sepllm.kernels import triton_sep

        interpreted = type(triton_sep._fwd_kernel).__name__ == "InterpretedFunction"
        if interpreted == ON_GPU:
            triton_sep = importlib.reload(triton_sep)
        return triton_sep
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


triton_sep = _import_kernel_module()


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


CASES = [
    # B, H, Hkv, S, D, w, a, separators, dtype, (BLOCK_M, BLOCK_N)
    (2, 2, 2, 50, 8, 1, 0, "none", "float32", (32, 32)),  # w=1, no sinks: no far key at all
    (1, 2, 1, 64, 16, 16, 1, "none", "float32", (16, 32)),  # StreamingLLM, GQA 2:1
    (2, 4, 2, 70, 8, 16, 4, "all", "float32", (32, 16)),  # every token a separator
    (3, 2, 2, 90, 16, 16, 4, "random", "float32", (32, 32)),  # rows with different counts
    (3, 2, 1, 77, 8, 1, 1, "random", "float32", (32, 32)),
    (2, 2, 2, 100, 8, 64, 4, "random", "float32", (32, 32)),
    (3, 2, 2, 60, 8, 16, 4, "leftpad", "float32", (16, 16)),  # left padding, adaptive sinks
    (2, 2, 1, 100, 8, 64, 0, "leftpad", "float32", (32, 32)),
    (1, 2, 2, 230, 8, 200, 4, "random", "float32", (64, 64)),  # w = 200 < S
    (1, 2, 2, 90, 8, 200, 1, "random", "float32", (32, 32)),  # w > S: all causal pairs
    (2, 2, 1, 80, 64, 16, 4, "random", "bfloat16", (32, 32)),  # head dim 64, bf16
    (1, 2, 2, 70, 128, 16, 4, "leftpad", "bfloat16", (32, 32)),  # head dim 128, bf16
    (2, 2, 2, 64, 8, 16, 4, "random", "float16", (32, 32)),
]


def _case_id(c) -> str:
    return f"{c[7]}-S{c[3]}-w{c[5]}-a{c[6]}-D{c[4]}-{c[8]}-H{c[1]}/{c[2]}"


def _inputs(case):
    """ids, config, (q, k, v, grad) in the case's dtype on DEVICE as [B, H, S, D] views of
    [B, S, H, D] storage (the model's layout), and the fp64 reference (out, dq, dk, dv)."""
    B, H, Hkv, S, D, w, a, kind, dtype, _ = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    ids, padded = make_ids(B, S, kind, gen)
    seps, cfg = case_config(kind, a, w, padded)
    dt = getattr(torch, dtype)
    tensors = [
        torch.randn(B, S, n, D, generator=gen).to(dt).transpose(1, 2) for n in (H, Hkv, Hkv, H)
    ]
    keep = reference_keep(ids, seps, a, w, padded)
    qr, kr, vr = (t.float().requires_grad_() for t in tensors[:3])
    ref = reference_attention(qr, kr, vr, keep)
    ref.backward(tensors[3].float())
    expected = (ref.detach(), qr.grad, kr.grad, vr.grad)
    return ids, cfg, [t.to(DEVICE) for t in tensors], expected


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_reference(case, monkeypatch: pytest.MonkeyPatch) -> None:
    block_m, block_n = case[-1]
    monkeypatch.setattr(triton_sep, "BLOCK_M", block_m)
    monkeypatch.setattr(triton_sep, "BLOCK_N", block_n)
    ids, cfg, (q, k, v, grad), expected = _inputs(case)
    kept = build_kept_set(ids.to(DEVICE), cfg)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = get_kernel("triton")(q, k, v, window=cfg.local_window, kept=kept)
    out.backward(grad)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = 1e-5 if case[8] == "float32" else 2e-2
    for name, x, y in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), expected):
        assert x.dtype == q.dtype, name
        # Half-precision gradients are sums of products of bf16-rounded probabilities (as in
        # FlashAttention): their absolute error grows with the gradient's scale, so the
        # absolute tolerance is 2e-2 of the largest reference entry (at least 2e-2).
        half = name != "out" and case[8] != "float32"
        atol = tol * max(1.0, y.abs().max().item()) if half else tol
        torch.testing.assert_close(
            x.float().cpu(), y, atol=atol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_plan_far_list_is_sorted_and_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    """The far list holds the initial positions then the separators (FAR_NONE padded), and
    far_cnt is the staircase of keys valid for each query block's last query."""
    ids, _ = make_ids(3, 90, "leftpad", torch.Generator().manual_seed(1))
    cfg = SepLLMConfig(
        mode="sepllm",
        separator_token_ids=[SEP],
        init_tokens=4,
        local_window=8,
        pad_token_id=PAD,
        batch_adaptive_init_pos=True,
    )
    kept = build_kept_set(ids, cfg)
    plan = triton_sep.build_plan(kept, 8, block_m=16)
    for b in range(3):
        row = ids[b].tolist()
        start = next(i for i, t in enumerate(row) if t != PAD)
        far = list(range(start, min(start + 4, 90)))
        far += [j for j in range(start + 4, 90) if row[j] == SEP]
        got = plan.far_pos[b].tolist()
        assert got[: len(far)] == far
        assert all(p == triton_sep.FAR_NONE for p in got[len(far) :])
        for n in range(plan.far_cnt.shape[1]):
            last = min(n * 16 + 15, 89)
            assert plan.far_cnt[b, n] == sum(p <= last - 8 for p in far)
    q = torch.randn(3, 2, 90, 8)
    for _ in range(2):  # every layer with this window reuses the batch's plan
        get_kernel("triton")(q, q, q, window=8, kept=kept)
    assert sum(1 for key in kept.cache if key[0] == "triton") == 1


def test_refuses_what_it_does_not_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    ids, _ = make_ids(1, 40, "random", torch.Generator().manual_seed(2))
    cfg = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=2, local_window=8)
    kept = build_kept_set(ids, cfg)
    q = torch.randn(1, 2, 40, 8)
    kernel = get_kernel("triton")
    with pytest.raises(ValueError, match="aligned kept set"):
        kernel(q, q, q, window=8, kept=None)
    with pytest.raises(ValueError, match="aligned kept set"):  # decode: q_len < kv_len
        kernel(q[:, :, :1], q, q, window=8, kept=kept)
    with pytest.raises(ValueError, match="no attention dropout"):
        kernel(q, q, q, window=8, kept=kept, dropout_p=0.1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        kernel(q, q, q, window=0, kept=kept)
    with pytest.raises(ValueError, match="kv heads must divide"):
        kernel(torch.randn(1, 3, 40, 8), q, q, window=8, kept=kept)
    if not ON_GPU:  # CPU tensors without the interpreter: a clear error, not a crash
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernel(q, q, q, window=8, kept=kept)


def test_kernel_compiles_for_a_gpu() -> None:
    """The interpreter never runs Triton's compiler: compile the four kernels (bf16, head dim
    128) to sm_90 cubins in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "megatron.sepllm.kernels.triton_compile", "--archs", "90"]
    cmd += ["--dtypes", "bf16", "--head-dims", "128"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 sepllm kernel variants for sm_90 ok" in proc.stdout
