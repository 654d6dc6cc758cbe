"""Fused RoPE / LayerNorm / RMSNorm kernels vs the PyTorch reference and torch.compile of it.

    python benchmarks/fused_kernels.py [--device cuda] [--dtype bfloat16] [--batch 4]
        [--shapes 160m 1.4b] [--reps 20] [--train-step] [--json out.json]

Each kernel is timed forward + backward (the gradient of a fixed random output grad) at
Pythia-160M (hidden 768, 12 heads of 64, rotary_pct 0.25 -> 16 rotary dims) and Pythia-1.4B
(hidden 2048, 16 heads of 128, 32 rotary dims) shapes, seq 2048. Columns: ms of `reference`
(the model's eager code), `compile` (torch.compile of it), `triton`, `cuda` (the extension) and
`apex`, then the speed-up of each fused one over the eager reference. The fused columns need a
CUDA device (on a CPU they are left empty: the Triton interpreter says nothing about speed).
`--train-step` also times one training step (fwd + bwd + AdamW) of a Pythia-160M-shaped
GPTModel at seq 2048 with fusion off and on.
Timing: interleaved rounds, minimum per implementation (the machines are shared).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron.fused_kernels import dispatch, functions, reference

SHAPES = {  # name -> (hidden, heads, rotary dims)
    "160m": (768, 12, 16),
    "1.4b": (2048, 16, 32),
}
FUSED = ("triton", "cuda", "apex")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Minimum seconds of each function over `rounds` interleaved rounds (after 2 warm-ups)."""
    for fn in fns.values():
        fn()
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _fwd_bwd(fn: Callable[..., torch.Tensor], args: list[torch.Tensor]) -> Callable[[], None]:
    grad = None

    def run() -> None:
        nonlocal grad
        out = fn(*args)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        for a in args:
            a.grad = None

    return run


@dataclass
class Problem:
    kind: str
    inputs: list[torch.Tensor]
    reference: Callable[..., torch.Tensor]
    fused: Callable[[Any], Callable[..., torch.Tensor]]  # kernels -> fn of the same inputs


def _norm_with(kernels: Any, rms: bool) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(kernels, dispatch._Apex):
            return kernels.norm(x, w, b, 1e-5, rms)
        return functions.norm(x, w, b, 1e-5, rms, kernels)

    return run


def problems(shape: str, batch: int, seq: int, device: str, dtype: torch.dtype) -> list[Problem]:
    hidden, heads, rot = SHAPES[shape]
    dim = hidden // heads
    qkv = torch.randn(batch, seq, 3 * hidden, device=device, dtype=dtype)
    # q as the model makes it: a [B, H, S, D] view into the fused projection's output.
    q = qkv[..., :hidden].view(batch, seq, heads, dim).transpose(1, 2).detach().requires_grad_()
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=device).float() / rot))
    freqs = torch.arange(seq, device=device).float()[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(hidden, device=device, dtype=dtype, requires_grad=True)
    return [
        Problem(
            "rope",
            [q],
            lambda q: reference.rope(q, cos, sin),
            lambda k: lambda q: functions.rope(q, cos, sin, k),
        ),
        Problem(
            "layernorm",
            [x, w, b],
            lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
            lambda k: _norm_with(k, False),
        ),
        Problem(
            "rmsnorm",
            [x, w],
            lambda x, w: reference.rms_norm(x, w, 1e-5),
            lambda k: _norm_with(k, True),
        ),
    ]


def _fused_runs(p: Problem, device: str) -> dict[str, Callable[[], None]]:
    runs: dict[str, Callable[[], None]] = {}
    if device != "cuda":
        return runs  # the fused columns stay empty on a CPU
    for impl in FUSED:
        kernels, why = dispatch.backend(impl)
        if kernels is None or (impl == "apex" and p.kind == "rope"):
            print(f"# {p.kind}: no {impl} ({why or 'apex has no RoPE'})")
            continue
        runs[impl] = _fwd_bwd(p.fused(kernels), p.inputs)
    return runs


def bench_kernels(args: argparse.Namespace, dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shapes:
        for p in problems(shape, args.batch, args.seq, args.device, dtype):
            fns = {"reference": _fwd_bwd(p.reference, p.inputs)}
            fns["compile"] = _fwd_bwd(torch.compile(p.reference, dynamic=False), p.inputs)
            fns.update(_fused_runs(p, args.device))
            best = time_interleaved(fns, args.reps)
            row = {"shape": shape, "kind": p.kind, **{k: v * 1e3 for k, v in best.items()}}
            rows.append(row)
            print(_row_text(row), flush=True)
    return rows


COLUMNS = ("reference", "compile", *FUSED)


def _row_text(row: dict[str, Any]) -> str:
    ms = [f"{row[c]:.3f}" if c in row else "" for c in COLUMNS]
    ref = row["reference"]
    speed = [f"{ref / row[c]:.2f}x" if c in row else "" for c in COLUMNS[1:]]
    return f"| {row['shape']} | {row['kind']} | " + " | ".join(ms + speed) + " |"


def _header() -> str:
    cols = [f"{c} ms" for c in COLUMNS] + [f"{c} speed-up" for c in COLUMNS[1:]]
    return "| shape | kernel | " + " | ".join(cols) + " |\n|---|---|" + "--:|" * len(cols)


def _pythia_160m(fusion: bool, seq: int) -> Any:
    from megatron.config.schema import ModelConfig

    return ModelConfig(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        seq_length=seq,
        rotary_pct=0.25,
        gpt_j_residual=True,
        rope_fusion=fusion,
        layernorm_fusion=fusion,
    )


def _wire(model: torch.nn.Module, fusion: bool) -> Callable[[], None]:
    """Turn fusion on in a built model whether or not transformer.py passes the keys yet;
    returns the undo (the rotary call in attention.py is module-level)."""
    from megatron.model import attention, rotary
    from megatron.model.norms import LayerNorm

    for mod in model.modules():
        if isinstance(mod, LayerNorm):
            mod.fusion = fusion
    original = attention.apply_rotary
    attention.apply_rotary = functools.partial(rotary.apply_rotary, fusion=fusion)

    def undo() -> None:
        attention.apply_rotary = original

    return undo


def bench_train_step(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, float]:
    """ms of one fwd + bwd + AdamW step of a Pythia-160M-shaped model, fusion off / on."""
    from megatron.config.schema import SepLLMConfig
    from megatron.model.transformer import GPTModel

    out = {}
    ids = torch.randint(0, 50304, (args.batch, args.seq + 1), device=args.device)
    for fusion in (False, True):
        torch.manual_seed(0)
        m = _pythia_160m(fusion, args.seq)
        model = GPTModel(m, SepLLMConfig(), 50304).to(args.device, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        undo = _wire(model, fusion)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out["fusion on" if fusion else "fusion off"] = (
            time_interleaved({"s": step}, args.reps)["s"] * 1e3
        )
        undo()
        del model, opt
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on cuda, 1 on cpu")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--train-step", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.batch = args.batch or (4 if cuda else 1)
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# {name}, torch {torch.__version__}, {dtype}, batch {args.batch}, seq {args.seq}")
    print(_header())
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "dtype": str(dtype)}
    result["kernels"] = bench_kernels(args, dtype)
    if args.train_step:
        result["train_step_ms"] = bench_train_step(args, dtype)
        print(f"# train step ms: {result['train_step_ms']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
