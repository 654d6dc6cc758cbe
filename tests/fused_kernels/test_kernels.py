"""Fused kernels against the PyTorch reference: outputs and gradients over shapes,
partial-rotary fractions, dtypes and non-contiguous inputs. Triton runs under the CPU
interpreter here and compiled on a GPU machine, where the CUDA extension is tested too (when
it is installed, or with SEPNEOX_FUSED_JIT=1 to build it)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron.fused_kernels import cuda_ext, dispatch, functions, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["triton", "cuda"])
def kernels(request: pytest.FixtureRequest) -> Any:
    if request.param == "cuda" and DEVICE == "cpu":
        pytest.skip("the CUDA extension needs a GPU")
    found, why = dispatch.backend(request.param)
    if found is None:
        pytest.skip(f"{request.param}: {why}")
    return found


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


def _tables(
    rot: int, seq: int, bsz: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # What RotaryEmbedding.cos_sin builds: [S, R], or [B, S, R] for per-sample positions.
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    pos = torch.arange(seq, dtype=torch.float32)
    if bsz is not None:
        pos = pos + torch.arange(bsz, dtype=torch.float32)[:, None] * 3  # distinct rows
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _model_layout(bsz: int, seq: int, heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    # q as the model makes it: a [B, H, S, D] view into the fused qkv projection's output.
    qkv = torch.randn(bsz, seq, 3 * heads * dim, dtype=torch.float32).to(dtype)
    return qkv[..., : heads * dim].view(bsz, seq, heads, dim).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,pct,per_sample,layout",
    [
        ((2, 3, 5, 16), 1.0, False, "model"),
        ((2, 3, 5, 16), 0.25, False, "model"),  # Pythia's rotary_pct
        ((1, 4, 7, 24), 0.5, True, "model"),  # [B, S, R] tables, non-power-of-two dims
        ((2, 2, 6, 12), 1.0 / 3, False, "contiguous"),  # a contiguous [B, H, S, D] input
        ((2, 2, 4, 8), 0.25, True, "sliced"),  # every stride unusual
    ],
)
def test_rope_matches_reference(
    shape: tuple[int, int, int, int],
    pct: float,
    per_sample: bool,
    layout: str,
    dtype: torch.dtype,
    kernels: Any,
) -> None:
    torch.manual_seed(0)
    bsz, heads, seq, dim = shape
    rot = int(dim * pct)
    if layout == "model":
        x = _model_layout(bsz, seq, heads, dim, dtype)
    elif layout == "contiguous":
        x = torch.randn(shape).to(dtype)
    else:
        x = torch.randn(bsz, heads * 2, seq, dim * 2).to(dtype)[:, ::2, :, 1::2]
    cos, sin = _tables(rot, seq, bsz if per_sample else None, dtype)
    x, cos, sin = x.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE)
    xf, xr = x.detach().requires_grad_(), x.detach().requires_grad_()
    out = functions.rope(xf, cos, sin, kernels)
    ref = reference.rope(xr, cos, sin)
    _close(out, ref, dtype)
    assert out.stride() == ref.stride()  # the same [B, S, H, D] storage behind the view
    grad = torch.randn(ref.shape).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    grad = grad.to(DEVICE)
    out.backward(grad)
    ref.backward(grad)
    _close(xf.grad, xr.grad, dtype)


def _norm_ref(
    rms: bool, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return reference.rms_norm(x, w, eps) if rms else reference.layer_norm(x, w, b, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kind,shape,bias,layout,weight_fp32",
    [
        ("layernorm", (2, 5, 24), True, "contiguous", False),
        ("layernorm", (3, 7, 20), False, "sliced", False),  # no bias; row stride > N
        ("layernorm", (4, 3, 16), True, "transposed", False),  # needs a copy
        ("rmsnorm", (2, 5, 24), False, "contiguous", False),
        ("rmsnorm", (3, 7, 20), False, "sliced", False),
        ("rmsnorm", (2, 6, 16), False, "contiguous", True),  # fp32 weight, promoted output
    ],
)
def test_norm_matches_reference(
    kind: str,
    shape: tuple[int, int, int],
    bias: bool,
    layout: str,
    weight_fp32: bool,
    dtype: torch.dtype,
    kernels: Any,
) -> None:
    if weight_fp32 and isinstance(kernels, cuda_ext.CudaKernels):
        pytest.skip("the CUDA extension takes the weight in the input's dtype")
    torch.manual_seed(1)
    n = shape[-1]
    if layout == "sliced":
        x = torch.randn(*shape[:-1], n + 7)[..., 3 : 3 + n].to(dtype)
    elif layout == "transposed":
        x = torch.randn(shape[1], shape[0], n).to(dtype).transpose(0, 1)
    else:
        x = torch.randn(shape).to(dtype)
    wdtype = torch.float32 if weight_fp32 else dtype
    w0 = (1 + 0.3 * torch.randn(n)).to(wdtype)
    b0 = (0.1 * torch.randn(n)).to(dtype) if bias else None
    rms = kind == "rmsnorm"
    params = [t.to(DEVICE) for t in (x, w0) + ((b0,) if bias else ())]
    ins = [t.detach().requires_grad_() for t in params]
    ref_ins = [t.detach().requires_grad_() for t in params]
    bf, br = (ins[2], ref_ins[2]) if bias else (None, None)
    out = functions.norm(ins[0], ins[1], bf, 1e-5, rms, kernels)
    ref = _norm_ref(rms, ref_ins[0], ref_ins[1], br, 1e-5)
    _close(out, ref, dtype)
    grad = torch.randn(ref.shape).to(ref.dtype).to(DEVICE)
    out.backward(grad)
    ref.backward(grad)
    _close(ins[0].grad, ref_ins[0].grad, dtype)
    for got, want in zip(ins[1:], ref_ins[1:]):
        _close_sum(got.grad, want.grad, dtype)


def _close_sum(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    # Weight / bias gradients are sums over every row: in bf16 the reference rounds each
    # product and the fused kernel only the total, so single entries near zero differ by more
    # than 2e-2 of themselves; compare the whole vector relative to its size instead.
    assert a.dtype == b.dtype and a.shape == b.shape
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < TOL[dtype], f"relative error {err:.3g}"


def test_norm_backward_many_rows_per_program(kernels: Any) -> None:
    # More rows than programs: each program's loop and the partial-sum reduction both count.
    torch.manual_seed(2)
    rows = 37 if DEVICE == "cpu" else 5000  # a GPU runs 4 programs per SM
    x = torch.randn(rows, 12, device=DEVICE, requires_grad=True)
    w = torch.randn(12, device=DEVICE, requires_grad=True)
    b = torch.randn(12, device=DEVICE, requires_grad=True)
    out = functions.norm(x, w, b, 1e-5, False, kernels)
    xr, wr, br = (t.detach().requires_grad_() for t in (x, w, b))
    ref = reference.layer_norm(xr, wr, br, 1e-5)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for got, want in ((x, xr), (w, wr), (b, br)):
        tol = 1e-5 if got is x else 1e-5 * rows**0.5  # parameter grads sum `rows` terms
        torch.testing.assert_close(got.grad, want.grad, atol=tol, rtol=1e-5)
