"""A tiny model trains with fusion requested and gives the reference losses on CPU, with one
warning per kind of op; with fusion off the path is the seed's eager code."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from megatron import fused_kernels
from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.model import attention, rotary
from megatron.model.norms import LayerNorm, RMSNorm
from megatron.model.transformer import GPTModel

FAMILIES = {
    "neox": dict(rotary_pct=0.25, gpt_j_residual=True),  # LayerNorm, partial rotary
    "llama": dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm", no_weight_tying=True),
}
VOCAB = 96


def _wire(model: GPTModel, m: ModelConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Honour the fusion keys where transformer.py / attention.py do not pass them yet."""
    for mod in model.modules():
        if isinstance(mod, LayerNorm) and m.layernorm_fusion:
            mod.fusion = True
        if isinstance(mod, RMSNorm) and m.rmsnorm_fusion:
            mod.fusion = True
    attn = model.blocks[0].attn
    if m.rope_fusion and not getattr(attn, "rope_fusion", False):
        fused = functools.partial(rotary.apply_rotary, fusion=True)
        monkeypatch.setattr(attention, "apply_rotary", fused)


def _train(family: str, fusion: bool, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    keys = dict(rope_fusion=fusion, layernorm_fusion=fusion, rmsnorm_fusion=fusion)
    m = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16)
    m = ModelConfig(**{**m.__dict__, **FAMILIES[family], **keys})
    torch.manual_seed(0)
    model = GPTModel(m, SepLLMConfig(), VOCAB)
    with monkeypatch.context() as patch:
        _wire(model, m, patch)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (2, m.seq_length + 1), generator=gen)
        losses = []
        for _ in range(4):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fusion_requested_on_cpu_gives_the_reference_losses(
    family: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="megatron")
    plain = _train(family, False, monkeypatch)
    assert not fused_kernels.used  # fusion off never enters the dispatch
    fused = _train(family, True, monkeypatch)
    assert fused == plain  # the very same floats: the reference is the model's own code
    assert plain[-1] < plain[0]
    norm = "rmsnorm" if family == "llama" else "layernorm"
    assert fused_kernels.used == {"rope": "reference", norm: "reference"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(w.split()[1] for w in warnings if w.startswith("fused")) == sorted(["rope", norm])


def _seed_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The seed's megatron/model/rotary.py, verbatim in substance, before the code moved.
    rot = cos.shape[-1]
    cos, sin = cos[..., None, :], sin[..., None, :]
    xs = x.transpose(1, 2)
    x_rot, x_pass = xs[..., :rot], xs[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    out = torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_path_is_the_seed_code(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    emb = rotary.RotaryEmbedding(8, 10000.0, 32)
    cos, sin = emb.cos_sin(torch.arange(12), dtype)
    x = torch.randn(2, 12, 4, 32).to(dtype).transpose(1, 2)
    assert torch.equal(rotary.apply_rotary(x, cos, sin), _seed_apply_rotary(x, cos, sin))
    norm = RMSNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    h = torch.randn(3, 32).to(dtype)
    x32 = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(norm(h), norm.weight * x32.to(dtype))
