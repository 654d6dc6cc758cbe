"""Self-Adjust softmax attention (Zheng et al., arXiv 2502.18277) behind the kernel contract.

Per query row i, with scaled scores s_ij = q_i . k_j / sqrt(D) and p_ij the softmax of s_i
over the row's kept keys (0 elsewhere):

    sa          a_ij = p_ij * (s_ij - m_i + b_num) / (M_i - m_i + b_den)
    sa_no_deno  a_ij = p_ij * s_ij

    m_i = min(0, min_j s_ij),  M_i = max(0, max_j s_ij)  over the row's *causal* keys
    (text position <= the query's, >= 0), kept or not; b_num / b_den are sepllm.sa_numerator_bias /
    sa_denominator_bias (the original's SA_Numerator_Bias / SA_Denominator_Bias)

out_i = sum_j a_ij v_j (rows no longer sum to 1; that is the method). The kept set decides
which keys get probability (None: every causal key, bottom-right aligned); the min / max
range follows the original SepLLM trainer, which takes them over the lower triangle of the
unmasked scores. Its code adds the denominator bias twice (a 1e-10 difference by default);
here it is added once, as its documentation says. Attention dropout drops entries of a.

Dense: scores, probabilities and the factor are [B, H, Sq, Sk] tensors (the original's
non-kernel path); autograd gives the backward. Any layout the dense kernel takes: training,
decode over a cache (positions from the kept set), kept=None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.info import KeptSet, dense_keep_mask

SA_KERNELS = ("sa", "sa_no_deno")  # the registry names; each is its own attention_kernel


def _masks(
    kept: KeptSet | None, window: int, q_len: int, kv_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:  # keep, causal: [B or 1, 1, Sq, Sk] bool
    if kept is None:  # full attention, bottom-right aligned
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        causal = causal.tril(diagonal=kv_len - q_len)[None, None]
        return causal, causal
    if (kept.q_len, kept.kv_len) != (q_len, kv_len):
        raise ValueError(
            f"kept set is for {kept.q_len} queries x {kept.kv_len} keys, got {q_len} x {kv_len}"
        )

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        keep = dense_keep_mask(kept, window)[:, None].to(device)
        if kept.aligned:
            i = torch.arange(q_len, device=device)
            causal = (i[None, :] <= i[:, None])[None, None]
        else:
            kpos, qpos = kept.key_pos[:, None, :], kept.query_pos[:, :, None]
            # A cache's empty slots sit at negative positions: they are no keys at all.
            causal = ((kpos <= qpos) & (kpos >= 0))[:, None]
        return keep, causal.to(device)

    # Same for every layer with this window: built once per batch.
    return kept.window_cache(("sa", window, device), build)


@dataclass(frozen=True)
class SelfAdjustSoftmax:
    """An AttentionKernel: Self-Adjust softmax with (`denominator`) or without it."""

    denominator: bool
    numerator_bias: float = 0.0
    denominator_bias: float = 1e-10

    def __call__(
        self,
        q: torch.Tensor,  # [B, H, Sq, D]
        k: torch.Tensor,  # [B, Hkv, Sk, D]
        v: torch.Tensor,  # [B, Hkv, Sk, D]
        *,
        window: int,
        kept: KeptSet | None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:  # [B, H, Sq, D]
        Sq, Sk = q.shape[2], k.shape[2]
        if Sq > Sk:
            raise ValueError(f"more queries ({Sq}) than keys ({Sk})")
        if q.shape[1] != k.shape[1]:  # grouped-query attention: each kv head serves a group
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        keep, causal = _masks(kept, window, Sq, Sk, q.device)
        # Half-precision inputs: scores and the softmax in fp32, as SDPA's math path does.
        work = torch.promote_types(q.dtype, torch.float32)
        s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) / math.sqrt(q.shape[-1])
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)  # [B, H, Sq, Sk]
        if self.denominator:
            zero = s.new_zeros(())
            low = torch.minimum(s.masked_fill(~causal, float("inf")).amin(-1, keepdim=True), zero)
            high = torch.maximum(s.masked_fill(~causal, float("-inf")).amax(-1, keepdim=True), zero)
            a = p * (s - low + self.numerator_bias) / (high - low + self.denominator_bias)
        else:
            a = p * s
        if dropout_p > 0.0:
            a = F.dropout(a, dropout_p)
        return torch.matmul(a.to(v.dtype), v)


def sa_kernel(name: str, sep: SepLLMConfig | None = None) -> SelfAdjustSoftmax:
    """The kernel registered as `name` ('sa' / 'sa_no_deno') with `sep`'s biases (the
    original's defaults when None)."""
    if name not in SA_KERNELS:
        raise ValueError(f"{name!r} is not a Self-Adjust softmax kernel; choose {SA_KERNELS}")
    if sep is None:
        return SelfAdjustSoftmax(denominator=name == "sa")
    return SelfAdjustSoftmax(name == "sa", sep.sa_numerator_bias, sep.sa_denominator_bias)
