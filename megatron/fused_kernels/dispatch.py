"""One dispatch for the fused ops: per call, the first implementation that is available and
supports the call; the PyTorch reference when none does.

Order: the CUDA extension, Triton, apex (norms only), the reference. A backend is probed once
(import, build) and its answer cached; each call then checks only what it needs (device, dtype,
shape). The first time a kind of op runs with an implementation, one log line names it: INFO
for a fused one, one WARNING saying why for the reference (never per call or per layer). A
fused kernel is also checked once per shape family against the reference on a tiny input of
the same head / feature sizes before first use: if it fails to compile or disagrees, the run
warns and goes on without it. Nothing here exits or waits without a deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from megatron.fused_kernels import functions, reference

log = logging.getLogger("megatron")

KINDS = ("rope", "layernorm", "rmsnorm")
ORDER = {"rope": ("cuda", "triton"), "layernorm": ("cuda", "triton", "apex")}
ORDER["rmsnorm"] = ORDER["layernorm"]
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# Devices the fused kernels run on. Tests add "cpu" to drive the Triton interpreter (and fake
# backends) through this dispatch; in a real run the CPU always gets the reference.
FUSED_DEVICES: tuple[str, ...] = ("cuda",)
_TRITON_MAX_N = 16384  # one row in registers: wider rows would spill

_backends: dict[str, tuple[Any, str]] = {}  # name -> (kernels or None, why unavailable)
_checked: dict[tuple, str] = {}  # (kind, backend, signature) -> "" (ok) or why not
_announced: set[tuple[str, str]] = set()
used: dict[str, str] = {}  # kind -> implementation of its latest first-use announcement


def reset() -> None:
    """Forget probes, checks and announcements (tests; after installing the extension)."""
    _backends.clear()
    _checked.clear()
    _announced.clear()
    used.clear()


def _probe_triton() -> Any:
    from megatron.fused_kernels import triton_kernels

    return triton_kernels


def _probe_cuda() -> Any:
    from megatron.fused_kernels import cuda_ext

    triton_ok = backend("triton")[0] is not None
    return cuda_ext.CudaKernels(cuda_ext.load(allow_jit=cuda_ext.jit_policy(triton_ok)))


class _Apex:
    """apex's fused norms (NVIDIA containers ship apex); the same calls as apex's own modules."""

    def __init__(self) -> None:
        from apex.normalization import fused_layer_norm

        self.mod = fused_layer_norm

    def norm(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float, rms: bool
    ) -> torch.Tensor:
        if rms:
            return self.mod.fused_rms_norm_affine(x, w, w.shape, eps)
        return self.mod.fused_layer_norm_affine(x, w, b, w.shape, eps)


_PROBES: dict[str, Callable[[], Any]] = {
    "cuda": _probe_cuda,
    "triton": _probe_triton,
    "apex": _Apex,
}


def backend(name: str) -> tuple[Any, str]:
    """(kernels, "") when `name` can run here, else (None, why); probed once."""
    if name not in _backends:
        try:
            _backends[name] = (_PROBES[name](), "")
        except Exception as e:  # ImportError, a failed build, a broken install: all non-fatal
            _backends[name] = (None, f"{type(e).__name__}: {e}".strip())
    return _backends[name]


def _rope_unsupported(name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str:
    if x.device.type not in FUSED_DEVICES:
        return f"input on {x.device.type} (fused kernels need a CUDA tensor)"
    if x.dtype not in _FLOATS or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return f"dtypes x {x.dtype}, cos {cos.dtype}, sin {sin.dtype}"
    if cos.requires_grad or sin.requires_grad:
        return "cos / sin need gradients"
    rot, (bsz, _, seq, dim) = cos.shape[-1], x.shape
    if rot % 2 or rot > dim or cos.shape != sin.shape or cos.shape[-2] != seq:
        return f"tables {tuple(cos.shape)} for x {tuple(x.shape)}"
    if cos.dim() == 3 and cos.shape[0] != bsz:
        return f"tables {tuple(cos.shape)} for x {tuple(x.shape)}"
    return ""


def _norm_unsupported(
    name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rms: bool
) -> str:
    if x.device.type not in FUSED_DEVICES:
        return f"input on {x.device.type} (fused kernels need a CUDA tensor)"
    if x.dtype not in _FLOATS or w.dtype not in _FLOATS or w.shape != x.shape[-1:]:
        return f"x {x.dtype} {tuple(x.shape)}, weight {w.dtype} {tuple(w.shape)}"
    # Only RMSNorm's reference mixes dtypes (fp32 weight, bf16 input); Triton handles that.
    mixed = w.dtype != x.dtype or (b is not None and b.dtype != x.dtype)
    if mixed and (not rms or name != "triton"):
        return f"weight {w.dtype} with input {x.dtype}"
    if name == "triton" and x.shape[-1] > _TRITON_MAX_N:
        return f"rows of {x.shape[-1]} > {_TRITON_MAX_N}"
    if name == "apex" and not rms and b is None:
        return "apex's fused LayerNorm needs a bias"
    return ""


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    tol = 1e-4 if out.dtype == torch.float32 else 5e-2
    return out.shape == ref.shape and torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)


def _self_check(
    run: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], args: list, n_grad: int
) -> str:
    """Forward + backward once on `args` (gradients for the first `n_grad`) with both
    implementations; "" if they agree, else why not."""
    try:
        with torch.enable_grad():
            ins = [a.detach().requires_grad_(i < n_grad) for i, a in enumerate(args)]
            ref_ins = [a.detach().requires_grad_(i < n_grad) for i, a in enumerate(args)]
            out, expect = run(*ins), ref(*ref_ins)
            # A private generator: the check must not move the run's random stream (dropout).
            gen = torch.Generator(expect.device).manual_seed(0)
            grad = torch.randn(expect.shape, generator=gen, device=expect.device)
            grad = grad.to(expect.dtype)
            out.backward(grad)
            expect.backward(grad)
        pairs = [(out, expect)] + [(a.grad, r.grad) for a, r in zip(ins[:n_grad], ref_ins)]
        if all(g is not None and _close(g, e) for g, e in pairs):
            return ""
        return "self-check against the reference failed (wrong results)"
    except Exception as e:  # a compile error of this GPU / this Triton
        return f"self-check raised {type(e).__name__}: {e}"


def _announce(kind: str, impl: str, reasons: list[str]) -> None:
    if (kind, impl) in _announced:
        return
    _announced.add((kind, impl))
    used[kind] = impl
    if impl == "reference":
        log.warning(
            "fused %s requested but unavailable; using the PyTorch reference instead (%s)",
            kind,
            "; ".join(reasons),
        )
    else:
        skipped = f" (skipped: {'; '.join(reasons)})" if reasons else ""
        log.info("fused %s: using the %s implementation%s", kind, impl, skipped)


def _pick(
    kind: str,
    unsupported: Callable[[str], str],
    check: Callable[[Any], str],
    signature: tuple,
) -> Any:
    """The first backend that supports this call and passed its check, or None."""
    reasons = []
    for name in ORDER[kind]:
        why = unsupported(name)
        kernels = None
        if not why:
            kernels, why = backend(name)
        if not why:
            key = (kind, name, signature)
            if key not in _checked:
                _checked[key] = check(kernels)
            why = _checked[key]
        if not why:
            _announce(kind, name, reasons)
            return kernels
        reasons.append(f"{name}: {why}")
    _announce(kind, "reference", reasons)
    return None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Fused `reference.rope`: same arguments, same [B, H, S, D] view of [B, S, H, D] output."""
    sig = (x.dtype, x.shape[1], x.shape[3], cos.shape[-1], cos.dim())

    def check(k: Any) -> str:  # one sequence, two positions, the call's heads and dims
        c, s = (cos[:2], sin[:2]) if cos.dim() == 2 else (cos[:1, :2], sin[:1, :2])
        return _self_check(
            lambda *a: functions.rope(*a, k), reference.rope, [x[:1, :, :2], c, s], 1
        )

    kernels = _pick("rope", lambda n: _rope_unsupported(n, x, cos, sin), check, sig)
    if kernels is None:
        return reference.rope(x, cos, sin)
    return functions.rope(x, cos, sin, kernels)


def _norm(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> Any:
    rms = kind == "rmsnorm"
    sig = (x.dtype, w.dtype, b is not None, x.shape[-1])
    ref = _reference_norm(kind, eps)

    def check(k: Any) -> str:  # three rows of the call's width and parameters
        small = [x.reshape(-1, x.shape[-1])[:3], w] + ([b] if b is not None else [])
        return _self_check(lambda *a: _run_norm(k, kind, a, eps), ref, small, len(small))

    kernels = _pick(kind, lambda n: _norm_unsupported(n, x, w, b, rms), check, sig)
    if kernels is None:
        return ref(x, w, b) if b is not None else ref(x, w)
    return _run_norm(kernels, kind, [x, w] + ([b] if b is not None else []), eps)


def _reference_norm(kind: str, eps: float) -> Callable[..., torch.Tensor]:
    if kind == "rmsnorm":
        return lambda x, w, b=None: reference.rms_norm(x, w, eps)
    return lambda x, w, b=None: reference.layer_norm(x, w, b, eps)


def _run_norm(kernels: Any, kind: str, args: list | tuple, eps: float) -> torch.Tensor:
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    if isinstance(kernels, _Apex):
        return kernels.norm(x, w, b, eps, kind == "rmsnorm")
    return functions.norm(x, w, b, eps, kind == "rmsnorm", kernels)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Fused `reference.layer_norm` (what nn.LayerNorm computes)."""
    return _norm("layernorm", x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused `reference.rms_norm`."""
    return _norm("rmsnorm", x, weight, None, eps)
