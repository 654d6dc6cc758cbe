"""select_kernel: every rule as a table row, and the training-layout choices against a frozen
copy of the selection as it was spread over get_kernel('auto'), Block.kernel and the compact
and flex kernels' internal re-dispatch (so moving it into one function changed nothing)."""

from __future__ import annotations

import importlib.util
import itertools
from typing import Any

import pytest

from megatron.sepllm import kernels, validate
from megatron.sepllm.kernels import KERNELS, select_kernel

BASE: dict[str, Any] = dict(
    requested="auto",
    device_type="cpu",
    q_len=1024,
    kv_len=1024,
    window=64,
    head_dim=64,
    dropout_p=0.0,
    flex_available=True,
    mode="sepllm",
    aligned=True,
    triton_available=False,
)

# (case id, changes to BASE, expected kernel name)
TABLE: list[tuple[str, dict[str, Any], str]] = [
    # full attention and windows covering the sequence
    ("full mode", dict(mode="full"), "causal"),
    ("full mode ignores the kernel name", dict(mode="full", requested="nope"), "causal"),
    ("full mode decode step (Sq < Sk)", dict(mode="full", q_len=1, aligned=False), "causal"),
    ("window == S", dict(window=1024), "causal"),
    ("window > S", dict(window=4096, requested="compact"), "causal"),
    ("window covers S, streamingllm", dict(window=2048, mode="streamingllm"), "causal"),
    # explicit requests that are honoured as they are
    ("causal requested", dict(requested="causal"), "causal"),
    ("dense requested", dict(requested="dense"), "dense"),
    ("dense requested with dropout", dict(requested="dense", dropout_p=0.1), "dense"),
    ("dense requested on cuda", dict(requested="dense", device_type="cuda"), "dense"),
    # decode steps (unaligned kept sets) only run on the dense reference
    ("decode, auto cpu", dict(q_len=1, kv_len=300, aligned=False), "dense"),
    ("decode, auto cuda", dict(q_len=1, device_type="cuda", aligned=False), "dense"),
    ("decode, compact", dict(requested="compact", q_len=4, aligned=False), "dense"),
    ("decode, flex", dict(requested="flex", device_type="cuda", q_len=4, aligned=False), "dense"),
    ("decode, window > kv_len", dict(q_len=1, kv_len=32, window=64, aligned=False), "dense"),
    ("decode, causal requested", dict(requested="causal", q_len=1, aligned=False), "causal"),
    # auto off CUDA: dense up to AUTO_DENSE_MAX_SEQ, then compact (and compact's rules)
    ("auto cpu S=128", dict(q_len=128, kv_len=128, window=16), "dense"),
    ("auto cpu S=512", dict(q_len=512, kv_len=512), "dense"),
    ("auto cpu S=513", dict(q_len=513, kv_len=513, window=16), "compact"),
    ("auto cpu S=1024 w=64", dict(), "compact"),
    ("auto cpu S <= 4w -> dense", dict(window=256), "dense"),
    ("auto cpu S = 4w + 4 -> compact", dict(q_len=1028, kv_len=1028, window=256), "compact"),
    ("auto cpu dropout -> dense", dict(dropout_p=0.1), "dense"),
    ("auto cpu ignores flex", dict(flex_available=True, q_len=8192, kv_len=8192), "compact"),
    ("auto mps S=512 (non-cuda)", dict(device_type="mps", q_len=512, kv_len=512), "dense"),
    ("auto mps S=1024", dict(device_type="mps"), "compact"),
    # auto on CUDA: flex below AUTO_CUDA_COMPACT_MIN_SEQ when importable, else compact
    ("auto cuda S=128", dict(device_type="cuda", q_len=128, kv_len=128, window=16), "flex"),
    ("auto cuda S=8191", dict(device_type="cuda", q_len=8191, kv_len=8191), "flex"),
    ("auto cuda S=8192", dict(device_type="cuda", q_len=8192, kv_len=8192), "compact"),
    ("auto cuda no flex", dict(device_type="cuda", flex_available=False), "compact"),
    (
        "auto cuda no flex, S<=4w",
        dict(device_type="cuda", flex_available=False, window=512),
        "dense",
    ),
    ("auto cuda flex dropout", dict(device_type="cuda", dropout_p=0.1), "dense"),
    ("auto cuda head dim 8", dict(device_type="cuda", head_dim=8), "compact"),
    ("auto cuda head dim 8, S<=4w", dict(device_type="cuda", head_dim=8, window=300), "dense"),
    ("auto cuda head dim 16", dict(device_type="cuda", head_dim=16), "flex"),
    (
        "auto cuda long, dropout",
        dict(device_type="cuda", q_len=9000, kv_len=9000, dropout_p=0.1),
        "dense",
    ),
    # flex requested
    ("flex cpu (eager, forward)", dict(requested="flex"), "flex"),
    ("flex cpu head dim 8", dict(requested="flex", head_dim=8), "flex"),
    ("flex cuda", dict(requested="flex", device_type="cuda"), "flex"),
    (
        "flex cuda long",
        dict(requested="flex", device_type="cuda", q_len=16384, kv_len=16384),
        "flex",
    ),
    ("flex dropout -> dense", dict(requested="flex", dropout_p=0.1), "dense"),
    (
        "flex cuda head dim 8 -> compact",
        dict(requested="flex", device_type="cuda", head_dim=8),
        "compact",
    ),
    (
        "flex cuda head dim 8, S<=4w -> dense",
        dict(requested="flex", device_type="cuda", head_dim=8, window=256),
        "dense",
    ),
    ("flex S <= 4w stays flex", dict(requested="flex", window=256), "flex"),
    # compact requested
    ("compact", dict(requested="compact"), "compact"),
    ("compact cuda", dict(requested="compact", device_type="cuda"), "compact"),
    ("compact dropout -> dense", dict(requested="compact", dropout_p=0.1), "dense"),
    ("compact S=4w -> dense", dict(requested="compact", window=256), "dense"),
    (
        "compact S=4w+1 -> compact",
        dict(requested="compact", q_len=1025, kv_len=1025, window=256),
        "compact",
    ),
    (
        "compact S<=4w but S > DENSE_MAX_SEQ",
        dict(requested="compact", q_len=8192, kv_len=8192, window=4096),
        "compact",
    ),
    (
        "compact S = DENSE_MAX_SEQ <= 4w",
        dict(requested="compact", q_len=4096, kv_len=4096, window=1024),
        "dense",
    ),
    # triton requested (where it can run: CUDA, or CPU under TRITON_INTERPRET=1)
    ("triton cuda", dict(requested="triton", device_type="cuda", triton_available=True), "triton"),
    (
        "triton cuda S <= 4w stays triton",
        dict(requested="triton", device_type="cuda", window=256, triton_available=True),
        "triton",
    ),
    (
        "triton cuda head dim 8",
        dict(requested="triton", device_type="cuda", head_dim=8, triton_available=True),
        "triton",
    ),
    (
        "triton dropout -> dense",
        dict(requested="triton", device_type="cuda", dropout_p=0.1, triton_available=True),
        "dense",
    ),
    (
        "triton head dim 512 -> compact",
        dict(requested="triton", device_type="cuda", head_dim=512, triton_available=True),
        "compact",
    ),
    (
        "triton decode -> dense",
        dict(requested="triton", device_type="cuda", q_len=1, aligned=False, triton_available=True),
        "dense",
    ),
    ("triton full mode", dict(requested="triton", mode="full"), "causal"),
    ("triton window covers S", dict(requested="triton", window=2048), "causal"),
    ("triton cpu interpreter", dict(requested="triton", triton_available=True), "triton"),
    # auto never picks triton while AUTO_CUDA_TRITON_MIN_SEQ is None (unmeasured)
    (
        "auto cuda S=16384, triton runnable",
        dict(device_type="cuda", q_len=16384, kv_len=16384, triton_available=True),
        "compact",
    ),
    ("auto cuda S=4096, triton runnable", dict(device_type="cuda", triton_available=True), "flex"),
    (
        "auto cpu interpreter S=8192",
        dict(q_len=8192, kv_len=8192, triton_available=True),
        "compact",
    ),
    ("compact window 0 (the kernel rejects it)", dict(requested="compact", window=0), "compact"),
    (
        "compact short S on cpu",
        dict(requested="compact", q_len=128, kv_len=128, window=16),
        "compact",
    ),
]


@pytest.mark.parametrize("changes, expected", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_select_kernel_table(changes: dict[str, Any], expected: str) -> None:
    args = {**BASE, **changes}
    assert select_kernel(args.pop("requested"), **args) == expected
    assert expected in KERNELS


ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown name", dict(requested="nope"), "unknown attention kernel 'nope'"),
    ("flex not importable", dict(requested="flex", flex_available=False), "needs torch.nn"),
    ("aligned with q_len != kv_len", dict(q_len=1), "aligned kept set has q_len == kv_len"),
    ("triton on cpu", dict(requested="triton"), "'triton' cannot run on 'cpu'"),
    (
        "triton on cuda without the package",
        dict(requested="triton", device_type="cuda"),
        "'triton' cannot run on 'cuda'",
    ),
    (
        "triton decode step where it cannot run",
        dict(requested="triton", q_len=1, aligned=False),
        "'triton' cannot run",
    ),
]


@pytest.mark.parametrize("changes, message", [t[1:] for t in ERRORS], ids=[t[0] for t in ERRORS])
def test_select_kernel_errors(changes: dict[str, Any], message: str) -> None:
    args = {**BASE, **changes}
    with pytest.raises(ValueError, match=message):
        select_kernel(args.pop("requested"), **args)


def _old_choice(
    requested: str, device: str, S: int, w: int, D: int, p: float, flex: bool, mode: str
) -> str:
    """The selection before select_kernel, transcribed: Block.kernel, get_kernel('auto'), then
    the kernel's own hand-offs (flex: dropout -> dense, CUDA D < 16 -> compact; compact:
    dropout -> dense, S <= 4 w and S <= 4096 -> dense)."""
    if mode == "full" or w >= S:
        return "causal"
    name = requested
    if name == "auto":
        if device != "cuda" and S <= 512:
            return "dense"
        name = "flex" if device == "cuda" and S < 8192 and flex else "compact"
    if name == "flex":
        if not flex:
            raise ValueError("flex unavailable")
        if p > 0.0:
            return "dense"
        if device == "cuda" and D < 16:
            name = "compact"
        else:
            return "flex"
    if name == "compact":
        if p > 0.0:
            return "dense"
        if S <= 4 * w and S <= 4096:
            return "dense"
        return "compact"
    if name not in ("causal", "dense"):
        raise ValueError("unknown")
    return name


def test_training_choices_match_the_previous_selection() -> None:
    grid = itertools.product(
        ["auto", "compact", "flex", "dense", "causal", "nope"],
        ["cpu", "cuda", "mps"],
        [1, 64, 128, 512, 513, 1024, 1025, 4096, 4097, 8191, 8192, 16384],
        [1, 16, 64, 256, 1024, 4096, 20000],
        [8, 16, 64],
        [0.0, 0.1],
        [True, False],
        ["full", "sepllm", "streamingllm"],
    )
    n = 0
    for requested, device, S, w, D, p, flex, mode in grid:
        try:
            old: str | type[Exception] = _old_choice(requested, device, S, w, D, p, flex, mode)
        except ValueError:
            old = ValueError
        kw = dict(q_len=S, kv_len=S, window=w, head_dim=D, dropout_p=p, flex_available=flex,
                  triton_available=False)  # fmt: skip
        try:
            new: str | type[Exception] = select_kernel(
                requested, device_type=device, mode=mode, aligned=True, **kw
            )
        except ValueError:
            new = ValueError
        assert new == old, (requested, device, S, w, D, p, flex, mode)
        n += 1
    assert n > 10000


def test_validate_takes_the_kernel_names_from_the_registry() -> None:
    assert set(validate.KERNEL_CHOICES) == {"auto", *KERNELS}
    # flex and triton are registered lazily (their modules import on first use)
    assert {"causal", "dense", "compact", "flex", "triton"} <= set(KERNELS)


def test_auto_cuda_triton_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once AUTO_CUDA_TRITON_MIN_SEQ is set (from a measurement), auto picks triton on CUDA
    from that length on, only where it can run, never with dropout or too large heads."""
    monkeypatch.setattr(kernels, "AUTO_CUDA_TRITON_MIN_SEQ", 4096)
    cuda = {**BASE, "device_type": "cuda", "triton_available": True}

    def pick(**changes: Any) -> str:
        args = {**cuda, **changes}
        return select_kernel(args.pop("requested"), **args)

    assert pick(q_len=4096, kv_len=4096) == "triton"
    assert pick(q_len=16384, kv_len=16384) == "triton"
    assert pick(q_len=4095, kv_len=4095) == "flex"  # below the gate: the measured rules
    assert pick(q_len=4096, kv_len=4096, triton_available=False) == "flex"
    assert pick(q_len=8192, kv_len=8192, triton_available=False) == "compact"
    assert pick(q_len=8192, kv_len=8192, dropout_p=0.1) == "dense"
    assert pick(q_len=8192, kv_len=8192, head_dim=512) == "compact"
    assert pick(q_len=8192, kv_len=8192, device_type="cpu") == "compact"
    assert pick(q_len=1, kv_len=8192, aligned=False) == "dense"  # decode steps


def test_triton_never_picked_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "AUTO_CUDA_TRITON_MIN_SEQ", 1)  # auto would take it anywhere
    grid = itertools.product(
        ["auto", "compact", "flex", "dense", "causal"],
        ["cpu", "cuda", "mps"],
        [128, 1024, 8192],
        [1, 64, 256],
        [8, 64, 512],
        [0.0, 0.1],
        [True, False],
    )
    for requested, device, S, w, D, p, aligned in grid:
        q_len = S if aligned else 1
        for runnable in (False, True):
            name = select_kernel(
                requested,
                device_type=device,
                q_len=q_len,
                kv_len=S,
                window=w,
                head_dim=D,
                dropout_p=p,
                flex_available=True,
                mode="sepllm",
                aligned=aligned,
                triton_available=runnable,
            )
            if name == "triton":
                assert runnable and device == "cuda" and aligned and p == 0.0 and D <= 256


def test_triton_availability_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """triton_available (what the callers pass to select_kernel): never CPU unless
    TRITON_INTERPRET=1 (then only if the triton package imports)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.triton_available("cpu")
    args = {**BASE, "triton_available": kernels.triton_available("cpu")}
    with pytest.raises(ValueError, match="cannot run on 'cpu'"):
        select_kernel("triton", **{k: v for k, v in args.items() if k != "requested"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    has_triton = importlib.util.find_spec("triton") is not None
    assert kernels.triton_available("cpu") == has_triton
