"""SepLLM kernels against an independent reference: an explicit kept mask built with loops
straight from the definition, and a plain masked softmax (no SDPA, no KeptSet helpers)."""

from __future__ import annotations

import inspect
import math
import zlib

import pytest
import torch

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.model.transformer import Block
from megatron.sepllm.info import KeptSet, build_kept_set
from megatron.sepllm.kernels import KERNELS, AttentionKernel, flex_available, get_kernel
from megatron.sepllm.kernels import compact as compact_mod
from megatron.sepllm.kernels import parts as parts_mod

SEP = 3  # separator id used by the synthetic batches
PAD = 0


def reference_keep(
    ids: torch.Tensor, seps: list[int], a: int, w: int, adaptive: bool, pad: int = PAD
) -> torch.Tensor:
    """[B, S, S] bool: keep(i, j) = j <= i and (initial or i - j < w or is_sep), by loops."""
    B, S = ids.shape
    keep = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        row = ids[b].tolist()
        start = 0
        if adaptive:
            while start < S and row[start] == pad:
                start += 1
        for i in range(S):
            for j in range(i + 1):
                init = start <= j < start + a
                sep = row[j] in seps and j >= start
                keep[b, i, j] = init or (i - j < w) or sep
    return keep


def reference_attention(q, k, v, keep):
    """Masked softmax attention in fp64; keep [B, S, S]; GQA by repeating k / v."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep[:, None], -math.inf)
    return (torch.softmax(s, -1) @ v.double()).float()


def case_config(kind: str, a: int, w: int, padded: bool) -> tuple[list[int], SepLLMConfig]:
    """Separator ids and the sepllm section of a synthetic case (`kind` as in make_ids)."""
    seps = [] if kind == "none" else [SEP, PAD]  # the pad id is a separator id too (GPT-2 "!")
    cfg = SepLLMConfig(
        mode="streamingllm" if kind == "none" else "sepllm",
        separator_token_ids=seps,
        init_tokens=a,
        local_window=w,
        pad_token_id=PAD,
        batch_adaptive_init_pos=padded,
    )
    return seps, cfg


def make_ids(B: int, S: int, sep_kind: str, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """Token ids in [4, 20) with separators (id 3) per `sep_kind`; returns (ids, left padded)."""
    ids = torch.randint(4, 20, (B, S), generator=gen)
    padded = False
    if sep_kind == "all":
        ids.fill_(SEP)
    elif sep_kind == "random":  # a different separator density in every row
        for b in range(B):
            p = 0.05 + 0.4 * b / max(B - 1, 1)
            ids[b][torch.rand(S, generator=gen) < p] = SEP
    elif sep_kind == "leftpad":  # rows padded on the left by different amounts
        ids[torch.rand(B, S, generator=gen) < 0.2] = SEP
        for b in range(B):
            ids[b, : (b * 7) % (S // 2)] = PAD
        padded = True
    return ids, padded


CASES = [
    # B, H, Hkv, S, D, w, a, separators
    (2, 2, 2, 50, 8, 7, 0, "none"),
    (1, 2, 2, 64, 8, 16, 1, "none"),
    (2, 4, 2, 70, 8, 5, 4, "all"),
    (3, 2, 2, 90, 16, 9, 4, "random"),
    (3, 4, 1, 77, 8, 1, 1, "random"),
    (2, 2, 2, 130, 8, 33, 4, "random"),
    (3, 2, 2, 60, 8, 6, 4, "leftpad"),
    (2, 4, 2, 100, 8, 20, 0, "leftpad"),
    (1, 2, 2, 300, 8, 40, 4, "random"),  # several query groups of the separator part
    (2, 2, 1, 40, 8, 64, 4, "random"),  # window >= S: full causal
]


def _run(kernel_name, q, k, v, w, kept, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = get_kernel(kernel_name)(q, k, v, window=w, kept=kept)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _prepare(case, kernel, monkeypatch):
    """Kernel switches for `kernel`, the case's ids / config and inputs, and the fp64
    reference (out, dq, dk, dv) of the loop-built kept mask."""
    monkeypatch.setattr(compact_mod, "SEP_QUERY_GROUP", 32)  # several separator-part groups
    if kernel == "compact-math":  # the explicit-matmul backend (non-CPU, non-CUDA devices)
        monkeypatch.setattr(parts_mod, "BACKEND_OVERRIDE", "math")
    B, H, Hkv, S, D, w, a, kind = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    ids, padded = make_ids(B, S, kind, gen)
    seps, cfg = case_config(kind, a, w, padded)
    keep = reference_keep(ids, seps, a, w, padded)
    q = torch.randn(B, H, S, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    grad = torch.randn(B, H, S, D, generator=gen)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qr, kr, vr, keep)
    ref.backward(grad)
    return ids, cfg, (q, k, v, grad), (ref.detach(), qr.grad, kr.grad, vr.grad)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[-1]}-S{c[3]}-w{c[5]}-a{c[6]}" for c in CASES])
@pytest.mark.parametrize("kernel", ["dense", "compact", "compact-bshd", "compact-math"])
def test_kernel_matches_reference(case, kernel, monkeypatch) -> None:
    ids, cfg, (q, k, v, grad), expected = _prepare(case, kernel, monkeypatch)
    kept = build_kept_set(ids, cfg)
    if kernel == "compact-bshd":  # [B, H, S, D] views of [B, S, H, D] storage, as in the model
        q, k, v, grad = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, grad))
    got = _run(kernel.split("-")[0], q, k, v, cfg.local_window, kept, grad)
    for x, y in zip(got, expected, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_compact_plan_is_shared_across_layers() -> None:
    ids, _ = make_ids(2, 80, "random", torch.Generator().manual_seed(0))
    cfg = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=2, local_window=8)
    kept = build_kept_set(ids, cfg)
    q = torch.randn(2, 2, 80, 8)
    for w in (8, 8, 16):
        get_kernel("compact")(q, q, q, window=w, kept=kept)
    assert sum(1 for key in kept.cache if key[0] == "compact") == 2  # one plan per window


def test_unknown_kernel_name() -> None:
    with pytest.raises(ValueError, match="unknown attention kernel"):
        get_kernel("nope")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        get_kernel("auto")  # resolved by select_kernel, never registered


@pytest.mark.parametrize("name", ["compact", "flex"])
def test_fast_kernels_reject_what_they_do_not_support(name: str) -> None:
    """compact / flex run only the aligned training layout without dropout; select_kernel
    sends everything else to causal / dense, and the kernels say so instead of re-dispatching."""
    if name == "flex" and not flex_available():
        pytest.skip("no FlexAttention in this torch")
    ids, _ = make_ids(1, 40, "random", torch.Generator().manual_seed(1))
    cfg = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=2, local_window=8)
    kept = build_kept_set(ids, cfg)
    q = torch.randn(1, 2, 40, 8)
    kern = get_kernel(name)
    with pytest.raises(ValueError, match="dropout"):
        kern(q, q, q, window=8, kept=kept, dropout_p=0.5)
    with pytest.raises(ValueError, match="aligned"):
        kern(q, q, q, window=8, kept=None)
    decode = KeptSet.from_cache(
        kept.key_pos, kept.is_sep, kept.init_start, kept.init_tokens, torch.arange(30, 40)
    )
    with pytest.raises(ValueError, match="aligned"):
        kern(q[:, :, 30:], q, q, window=8, kept=decode)


def test_block_warns_when_dropout_forces_the_dense_kernel(monkeypatch) -> None:
    m = ModelConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=600, attention_dropout=0.1
    )
    cfg = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=2, local_window=8)
    block = Block(m, cfg, window=8)
    kept = build_kept_set(torch.full((1, 600), SEP), cfg)
    monkeypatch.setattr(Block, "_dropout_warned", False)
    with pytest.warns(UserWarning, match="the compact kernel has none"):
        assert block.kernel(kept, 600, torch.device("cpu")) is get_kernel("dense")
    block.eval()  # no dropout at eval: the compact kernel again
    assert block.kernel(kept, 600, torch.device("cpu")) is get_kernel("compact")


def brute_force_attention(q, k, v, key_pos, is_sep, start, a, query_pos, w):
    """fp64, one query at a time, keys chosen straight from the kept rule by text position:
    kpos <= qpos and (start <= kpos < start + a or qpos - kpos < w or is_sep); w=None keeps
    every key with kpos <= qpos."""
    B, H, Sq, D = q.shape
    rep = H // k.shape[1]
    out = torch.zeros(B, H, Sq, D, dtype=torch.float64)
    for b in range(B):
        for i in range(Sq):
            qp = int(query_pos[b, i])
            keep = []
            for j, kp in enumerate(key_pos[b].tolist()):
                init = start[b] <= kp < start[b] + a
                local = w is None or qp - kp < w
                if kp <= qp and (init or local or bool(is_sep[b, j])):
                    keep.append(j)
            for h in range(H):
                kk, vv = k[b, h // rep, keep].double(), v[b, h // rep, keep].double()
                p = torch.softmax(kk @ q[b, h, i].double() / math.sqrt(D), 0)
                out[b, h, i] = p @ vv
    return out.float()


def _compacted_cache(gen: torch.Generator, B: int, T: int, a: int, w: int, keep_far: float):
    """Key positions / separator flags / init starts of a cache after T tokens of text: the
    initial tokens, the separators before the window (some dropped, as a size-bounded cache
    does), a few other old tokens not evicted yet, and the last w + 3 tokens."""
    positions, flags, starts = [], [], []
    for b in range(B):
        start = 3 * b  # left padding of 3 * b tokens
        text_sep = torch.rand(T, generator=gen) < 0.2
        text_sep[:start] = False
        kept_pos = []
        for t in range(T):
            recent = t >= T - (w + 3)
            initial = start <= t < start + a
            far = (text_sep[t] or torch.rand(1, generator=gen).item() < 0.05) and (
                torch.rand(1, generator=gen).item() < keep_far
            )
            if recent or initial or far:
                kept_pos.append(t)
        positions.append(kept_pos)
        flags.append([bool(text_sep[t]) for t in kept_pos])
        starts.append(start)
    Sk = min(len(x) for x in positions)  # equal lengths: drop the oldest far keys of longer rows
    for b in range(B):
        extra = len(positions[b]) - Sk
        far_idx = [i for i, t in enumerate(positions[b]) if t >= starts[b] + a][:extra]
        positions[b] = [t for i, t in enumerate(positions[b]) if i not in far_idx]
        flags[b] = [f for i, f in enumerate(flags[b]) if i not in far_idx]
    return torch.tensor(positions), torch.tensor(flags), torch.tensor(starts)


@pytest.mark.parametrize("Sq, Hkv, w, a", [(1, 2, 8, 4), (3, 1, 5, 2), (4, 4, 16, 0)])
def test_dense_decode_step_matches_brute_force(Sq: int, Hkv: int, w: int, a: int) -> None:
    """A decode step: Sq new queries (the newest cached keys) over a compacted cache whose keys
    sit at arbitrary increasing text positions."""
    gen = torch.Generator().manual_seed(Sq * 100 + w)
    B, H, D = 2, 4, 8
    key_pos, is_sep, start = _compacted_cache(gen, B, 120, a, w, keep_far=0.7)
    query_pos = key_pos[:, -Sq:]
    kept = KeptSet.from_cache(key_pos, is_sep, start, a, query_pos)
    assert not kept.aligned and (kept.q_len, kept.kv_len) == (Sq, key_pos.shape[1])
    Sk = kept.kv_len
    q = torch.randn(B, H, Sq, D, generator=gen)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=gen) for _ in range(2))
    out = get_kernel("dense")(q, k, v, window=w, kept=kept)
    ref = brute_force_attention(q, k, v, key_pos, is_sep, start, a, query_pos, w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the same queries at positions shared by both rows ([Sq] form), older than the newest key
    shared = torch.arange(Sq) + int(key_pos[:, -1].min()) - Sq
    kept = KeptSet.from_cache(key_pos, is_sep, start, a, shared)
    out = get_kernel("dense")(q, k, v, window=w, kept=kept)
    ref = brute_force_attention(q, k, v, key_pos, is_sep, start, a, kept.query_pos, w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_over_a_full_cache_equals_the_training_rows() -> None:
    """Queries S-Sq..S-1 over a cache holding every key give the last Sq rows of training."""
    ids, _ = make_ids(2, 70, "leftpad", torch.Generator().manual_seed(5))
    cfg = SepLLMConfig(
        mode="sepllm",
        separator_token_ids=[SEP, PAD],
        init_tokens=3,
        local_window=6,
        batch_adaptive_init_pos=True,
    )
    train = build_kept_set(ids, cfg)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 70, 8, generator=gen) for _ in range(3))
    full = get_kernel("dense")(q, k, v, window=6, kept=train)
    for Sq in (1, 5):
        step = KeptSet.from_cache(
            train.key_pos, train.is_sep, train.init_start, 3, torch.arange(70 - Sq, 70)
        )
        out = get_kernel("dense")(q[:, :, -Sq:], k, v, window=6, kept=step)
        torch.testing.assert_close(out, full[:, :, -Sq:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["causal", "dense"])
@pytest.mark.parametrize("Sq", [1, 7, 40])
def test_full_causal_with_fewer_queries_is_bottom_right_aligned(kernel: str, Sq: int) -> None:
    """kept=None with Sq < Sk: query i is text position Sk - Sq + i and sees every key up to it
    (SDPA's is_causal alone would align the queries to the first keys)."""
    gen = torch.Generator().manual_seed(Sq)
    B, H, Hkv, Sk, D = 2, 4, 2, 40, 8
    q = torch.randn(B, H, Sk, D, generator=gen)
    k, v = (torch.randn(B, Hkv, Sk, D, generator=gen) for _ in range(2))
    out = get_kernel(kernel)(q[:, :, -Sq:], k, v, window=4, kept=None)
    pos = torch.arange(Sk).expand(B, Sk)
    no_sep = torch.zeros(B, Sk, dtype=torch.bool)
    ref = brute_force_attention(q[:, :, -Sq:], k, v, pos, no_sep, [0, 0], 0, pos[:, -Sq:], w=None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    full = get_kernel("causal")(q, k, v, window=4, kept=None)
    torch.testing.assert_close(out, full[:, :, -Sq:], atol=1e-6, rtol=1e-6)


def test_more_queries_than_keys_is_an_error() -> None:
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="more queries"):
        get_kernel("causal")(q, q[:, :, :3], q[:, :, :3], window=1, kept=None)


def test_every_kernel_has_the_protocol_signature() -> None:
    expected = list(inspect.signature(AttentionKernel.__call__).parameters.values())[1:]
    kernels = dict(KERNELS)
    if flex_available():
        kernels["flex (loaded)"] = get_kernel("flex")
    for name, kern in kernels.items():
        params = list(inspect.signature(kern).parameters.values())
        got = [(p.name, p.kind, p.default) for p in params]
        assert got == [(p.name, p.kind, p.default) for p in expected], name


def test_block_sends_a_decode_step_to_the_dense_kernel() -> None:
    m = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=600)
    cfg = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=2, local_window=8)
    block = Block(m, cfg, window=8).eval()
    train = build_kept_set(torch.full((1, 600), SEP), cfg)
    assert block.kernel(train, 600, torch.device("cpu")) is get_kernel("compact")
    step = KeptSet.from_cache(train.key_pos, train.is_sep, train.init_start, 2, torch.tensor([599]))
    assert block.kernel(step, 1, torch.device("cpu")) is get_kernel("dense")
    full = Block(m, SepLLMConfig(mode="full"), window=600).eval()
    assert full.kernel(None, 1, torch.device("cpu")) is get_kernel("causal")


def _flex_runs_on_cpu() -> bool:
    try:
        kern = get_kernel("flex")
        ids = torch.full((1, 16), 5)
        cfg = SepLLMConfig(mode="streamingllm", init_tokens=1, local_window=4)
        q = torch.randn(1, 1, 16, 8)
        kern(q, q, q, window=4, kept=build_kept_set(ids, cfg))
    except Exception:
        return False
    return True


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[6], CASES[8]])
def test_flex_forward_matches_reference(case) -> None:
    if not _flex_runs_on_cpu():
        pytest.skip("flex_attention cannot run on this CPU build")
    B, H, Hkv, S, D, w, a, kind = case
    gen = torch.Generator().manual_seed(7)
    ids, padded = make_ids(B, S, kind, gen)
    seps, cfg = case_config(kind, a, w, padded)
    kept = build_kept_set(ids, cfg)
    q = torch.randn(B, H, S, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    out = get_kernel("flex")(q, k, v, window=w, kept=kept)
    ref = reference_attention(q, k, v, reference_keep(ids, seps, a, w, padded))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert any(key[0] == "flex" for key in kept.cache)  # block mask cached per window


def test_fused_cpu_parts_match_math_parts(monkeypatch) -> None:
    """The CPU flash part op and the explicit-matmul part agree (rows that keep no key are
    compared on the output only: the fused op reports their log-sum-exp as 0, math as -inf)."""
    gen = torch.Generator().manual_seed(3)
    N, H, Sq, Sk, D = 3, 2, 37, 29, 16
    q, do = (torch.randn(N, H, Sq, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(N, H, Sk, D, generator=gen) for _ in range(2))
    keep = torch.rand(N, 1, Sq, Sk, generator=gen) < 0.3
    keep[:, :, 5] = False  # an empty row
    mask = torch.zeros(N, 1, Sq, Sk).masked_fill_(~keep, -math.inf)
    results = {}
    for backend in ("cpu", "math"):
        monkeypatch.setattr(parts_mod, "BACKEND_OVERRIDE", backend)
        out, lse = parts_mod.part_forward(q, k, v, mask)
        # backward with a larger "merged" lse, as when another part also contributed
        merged = torch.logaddexp(lse.masked_fill(~keep.any(-1), -math.inf), lse.new_tensor(0.5))
        grads = parts_mod.part_backward(do, q, k, v, out, merged, mask)
        results[backend] = (out, lse, grads)
    (o1, l1, g1), (o2, l2, g2) = results["cpu"], results["math"]
    rows = keep.any(-1).expand(N, H, Sq)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1[rows], l2[rows], atol=1e-5, rtol=1e-5)
    assert torch.isinf(l2[~rows]).all()
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


CUDA_CASES = [c for c in CASES if c[3] >= 60]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"{c[-1]}-S{c[3]}-w{c[5]}" for c in CUDA_CASES])
@pytest.mark.parametrize("kernel", ["compact", "compact-math", "flex", "dense"])
def test_kernels_on_cuda(case, kernel, monkeypatch) -> None:
    """Forward and backward on the GPU (memory-efficient part op, explicit-matmul parts,
    compiled FlexAttention, mask reference) against the fp64 CPU reference."""
    ids, cfg, inputs, expected = _prepare(case, kernel, monkeypatch)
    q, k, v, grad = (t.cuda() for t in inputs)
    kept = build_kept_set(ids.cuda(), cfg)
    got = _run(kernel.split("-")[0], q, k, v, cfg.local_window, kept, grad)
    for x, y in zip(got, expected, strict=True):
        torch.testing.assert_close(x.cpu(), y, atol=2e-5, rtol=2e-5)
