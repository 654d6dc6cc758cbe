"""Self-Adjust softmax kernels against the formula written out per query row in fp64 (no
KeptSet helpers, no masks from the package), their gradients by finite differences, and the
original's keys and exclusivity rules."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.model.transformer import Block
from megatron.sepllm.aliases import apply_sepllm_aliases
from megatron.sepllm.info import KeptSet, build_kept_set
from megatron.sepllm.kernels import get_kernel, select_kernel
from megatron.sepllm.kernels.sa_softmax import SelfAdjustSoftmax

SEP = 3


def sa_reference(q, k, v, key_pos, is_sep, a, query_pos, w, denominator, nb=0.0, db=1e-10):
    """One query row at a time: kept keys by the rule (kpos <= qpos and (kpos < a or
    qpos - kpos < w or separator)), causal keys kpos <= qpos (>= 0), then
    a_ij = softmax_kept(s)_j * (s_j - min(0, min_causal s) + nb) / (max(0, max_causal s) -
    min(0, min_causal s) + db), or softmax_kept(s)_j * s_j without the denominator."""
    B, H, Sq, D = q.shape
    rep = H // k.shape[1]
    out = torch.zeros(B, H, Sq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                qp = int(query_pos[b, i])
                kept, causal = [], []
                for j, kp in enumerate(key_pos[b].tolist()):
                    if 0 <= kp <= qp:
                        causal.append(j)
                        if kp < a or qp - kp < w or bool(is_sep[b, j]):
                            kept.append(j)
                s = [float(q[b, h, i].double() @ k[b, h // rep, j].double()) / math.sqrt(D)
                     for j in range(k.shape[2])]  # fmt: skip
                z = sum(math.exp(s[j]) for j in kept)
                low = min(0.0, min(s[j] for j in causal))
                high = max(0.0, max(s[j] for j in causal))
                for j in kept:
                    p = math.exp(s[j]) / z
                    f = (s[j] - low + nb) / (high - low + db) if denominator else s[j]
                    out[b, h, i] += p * f * v[b, h // rep, j].double()
    return out


def _qkv(B, H, Hkv, Sq, Sk, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g, dtype=dtype) * 1.5
    k, v = (torch.randn(B, Hkv, Sk, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _ids(B, S, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 20, (B, S), generator=g)
    ids[torch.rand(B, S, generator=g) < 0.25] = SEP
    return ids


@pytest.mark.parametrize("denominator", [True, False])
def test_training_layout_matches_the_formula(denominator: bool) -> None:
    B, H, Hkv, S, D, a, w = 2, 4, 2, 14, 8, 2, 3
    ids = _ids(B, S, 1)
    kept = build_kept_set(ids, SepLLMConfig(mode="sepllm", separator_token_ids=[SEP],
                                            init_tokens=a, local_window=w))  # fmt: skip
    q, k, v = _qkv(B, H, Hkv, S, S, D, 2)
    kern = SelfAdjustSoftmax(denominator, numerator_bias=0.3, denominator_bias=0.05)
    out = kern(q, k, v, window=w, kept=kept)
    pos = torch.arange(S).expand(B, S)
    ref = sa_reference(q, k, v, pos, ids == SEP, a, pos, w, denominator, 0.3, 0.05)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # float32 inputs: same numbers to float precision
    out32 = kern(q.float(), k.float(), v.float(), window=w, kept=kept)
    torch.testing.assert_close(out32.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["sa", "sa_no_deno"])
def test_full_attention_bottom_right_and_a_decode_step(name: str) -> None:
    B, H, Sq, Sk, D = 1, 2, 3, 9, 4
    q, k, v = _qkv(B, H, H, Sq, Sk, D, 3)
    kern = get_kernel(name)
    pos = torch.arange(Sk).expand(B, Sk)
    no_sep = torch.zeros(B, Sk, dtype=torch.bool)
    ref = sa_reference(q, k, v, pos, no_sep, 0, pos[:, -Sq:], 1 << 30, name == "sa")
    torch.testing.assert_close(kern(q, k, v, window=4, kept=None), ref, atol=1e-12, rtol=0)
    # a compacted cache: keys at text positions with gaps, one empty slot (negative position)
    key_pos = torch.tensor([[-(1 << 50), 0, 1, 5, 9, 12, 13, 14, 15]])
    is_sep = torch.tensor([[False, False, False, True, True, False, False, False, False]])
    kept = KeptSet.from_cache(key_pos, is_sep, torch.zeros(1, dtype=torch.long), 2,
                              key_pos[:, -Sq:])  # fmt: skip
    out = kern(q, k, v, window=3, kept=kept)
    ref = sa_reference(q, k, v, key_pos, is_sep, 2, key_pos[:, -Sq:], 3, name == "sa")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("denominator", [True, False])
def test_gradients(denominator: bool) -> None:
    B, H, Hkv, S, D, a, w = 1, 2, 1, 7, 3, 1, 2
    ids = _ids(B, S, 4)
    cfg = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=a, local_window=w)
    kept = build_kept_set(ids, cfg)
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, Hkv, S, S, D, 5))
    kern = SelfAdjustSoftmax(denominator, numerator_bias=0.1, denominator_bias=0.2)

    def f(q, k, v):
        return kern(q, k, v, window=w, kept=kept)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)
    # and the same gradients as autograd through the per-row formula
    pos = torch.arange(S).expand(B, S)
    d_out = torch.randn(B, H, S, D, dtype=torch.float64)
    got = torch.autograd.grad(f(q, k, v), (q, k, v), d_out)
    ref = _reference_autograd(q, k, v, pos, ids == SEP, a, w, denominator, 0.1, 0.2)
    want = torch.autograd.grad(ref, (q, k, v), d_out)
    for g_, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g_, w_, atol=1e-10, rtol=1e-10)


def _reference_autograd(q, k, v, pos, is_sep, a, w, denominator, nb, db):
    """The formula with differentiable torch ops, one (b, h, i) row at a time."""
    B, H, S, D = q.shape
    rep = H // k.shape[1]
    rows = []
    for b in range(B):
        for h in range(H):
            for i in range(S):
                causal = list(range(i + 1))
                kept = [j for j in causal if j < a or i - j < w or bool(is_sep[b, j])]
                s = (k[b, h // rep, : i + 1] @ q[b, h, i]) / math.sqrt(D)
                p = torch.softmax(s[kept], 0)
                if denominator:
                    low = torch.clamp(s.min(), max=0.0)
                    high = torch.clamp(s.max(), min=0.0)
                    f = (s[kept] - low + nb) / (high - low + db)
                else:
                    f = s[kept]
                rows.append((p * f) @ v[b, h // rep, kept])
    return torch.stack(rows).view(B, H, S, -1)


def test_select_kernel_honours_sa_everywhere() -> None:
    base = dict(device_type="cpu", q_len=64, kv_len=64, window=8, head_dim=16, dropout_p=0.1,
                flex_available=True, triton_available=False)  # fmt: skip
    for name in ("sa", "sa_no_deno"):
        assert select_kernel(name, mode="full", **base) == name
        assert select_kernel(name, mode="sepllm", **{**base, "window": 64}) == name
        decode = {**base, "q_len": 1}
        assert select_kernel(name, mode="sepllm", aligned=False, **decode) == name


def test_block_binds_the_sections_biases() -> None:
    m = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=32)
    sep = SepLLMConfig(mode="full", attention_kernel="sa", sa_numerator_bias=0.5,
                       sa_denominator_bias=0.25)  # fmt: skip
    kern = Block(m, sep, window=32).kernel(None, 32, torch.device("cpu"))
    assert kern == SelfAdjustSoftmax(True, 0.5, 0.25)


def test_original_keys() -> None:
    out = apply_sepllm_aliases({"USE_SA_SOFTMAX": True, "SA_Numerator_Bias": 0.5,
                                "USE_SEP_ATTN_KERNEL_ACCELERATOR": False})  # fmt: skip
    assert out["attention_kernel"] == "sa" and out["sa_numerator_bias"] == 0.5
    out = apply_sepllm_aliases({"USE_SA_SOFTMAX_NO_DENO": True, "SA_Denominator_Bias": 1e-6})
    assert out["attention_kernel"] == "sa_no_deno" and out["sa_denominator_bias"] == 1e-6
    assert out["mode"] == "sepllm"  # neither full nor streaming: the original's SepLLM mask
    assert "attention_kernel" not in apply_sepllm_aliases({"USE_SA_SOFTMAX": False})


@pytest.mark.parametrize(
    "other",
    ["USE_SA_SOFTMAX_NO_DENO", "USE_ORIGINAL_FULL_ATTEN", "streamingLLM",
     "USE_SEP_ATTN_KERNEL_ACCELERATOR"],
)  # fmt: skip
def test_original_exclusivity(other: str) -> None:
    with pytest.raises(ValueError, match="at most one of") as err:
        apply_sepllm_aliases({"USE_SA_SOFTMAX": True, other: True})
    true_here = str(err.value).split("true here: ")[1].split(", ")
    assert sorted(true_here) == sorted(["USE_SA_SOFTMAX", other])


@pytest.mark.parametrize("name", ["sa", "sa_no_deno"])
def test_model_decode_equals_the_full_forward(name: str) -> None:
    """A Self-Adjust softmax model decoded over a cache that keeps everything gives the logits
    of one forward (the kernel runs in both; min / max over the held causal keys)."""
    from megatron.inference.caches import StreamCache, make_policies
    from megatron.model.transformer import GPTModel

    m = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24)
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=[SEP], init_tokens=2, local_window=4,
                       attention_kernel=name, sa_numerator_bias=0.1)  # fmt: skip
    torch.manual_seed(0)
    model = GPTModel(m, sep, vocab_size=20).eval()
    ids = _ids(2, 18, 6)
    with torch.no_grad():
        full = model(ids)
        plain = GPTModel(m, SepLLMConfig(**{**sep.__dict__, "attention_kernel": "dense"}), 20)
        plain.load_state_dict(model.state_dict())
        assert (plain.eval()(ids) - full).abs().max() > 1e-3  # the variant changes the model
        cache = StreamCache(make_policies("full", 2), [SEP], pos_shift=False)
        steps = [
            model(ids[:, a:b], cache=cache)
            for a, b in [(0, 7), *[(t, t + 1) for t in range(7, 18)]]
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
