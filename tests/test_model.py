"""Model shapes, gradients, learning on a fixed batch, init and schedule (no DeepSpeed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.config.schema import ModelConfig, OptimizerConfig, ScheduleConfig, SepLLMConfig
from megatron.model.transformer import GPTModel
from megatron.training.optimizer import build_optimizer
from megatron.training.schedule import lr_at

FAMILIES = {
    "neox": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=32,
        rotary_pct=0.25,
        gpt_j_residual=True,
    ),
    "llama": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_heads=2,
        seq_length=32,
        activation="swiglu",
        norm="rmsnorm",
        use_bias_in_attn_linear=False,
        use_bias_in_mlp=False,
        no_weight_tying=True,
    ),
    "learned_pos": dict(
        num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16, pos_emb="learned"
    ),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_backward_shapes(name: str) -> None:
    m = ModelConfig(**FAMILIES[name])
    model = GPTModel(m, SepLLMConfig(), vocab_size=80)
    ids = torch.randint(0, 80, (3, m.seq_length))
    logits = model(ids)
    assert logits.shape == (3, m.seq_length, 80)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["neox", "llama"])
def test_loss_decreases_on_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    m = ModelConfig(**FAMILIES[name])
    model = GPTModel(m, SepLLMConfig(), vocab_size=64)
    opt = build_optimizer(model, OptimizerConfig(lr=3e-3, weight_decay=0.0))
    tokens = torch.randint(0, 64, (4, m.seq_length + 1))
    losses = []
    for _ in range(40):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), abs=0.3)  # starts near uniform
    assert losses[-1] < 0.5 * losses[0]  # memorises the batch


def test_causality() -> None:
    m = ModelConfig(**FAMILIES["neox"])
    model = GPTModel(m, SepLLMConfig(), vocab_size=50).eval()
    ids = torch.randint(0, 50, (1, m.seq_length))
    changed = ids.clone()
    changed[0, 20] = (ids[0, 20] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_neox_init_stds() -> None:
    m = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=8)
    model = GPTModel(m, SepLLMConfig(), vocab_size=4096)
    small = math.sqrt(2 / (5 * 256))
    wang = 2 / 4 / math.sqrt(256)
    assert model.embedding.embed.weight.std().item() == pytest.approx(small, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(small, rel=0.05)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(wang, rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones(256))


def test_weight_decay_groups() -> None:
    model = GPTModel(ModelConfig(**FAMILIES["neox"]), SepLLMConfig(), vocab_size=64)
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(1 for _ in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_lr_schedule(style: str) -> None:
    opt = OptimizerConfig(lr=1.0)
    sched = ScheduleConfig(lr_decay_style=style, warmup=0.1, min_lr=0.1)
    lrs = [lr_at(s, opt, sched, train_iters=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    if style == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[-1] == pytest.approx(0.1, abs=0.02)
        assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    mid = {"linear": 0.55, "cosine": 0.55, "constant": 1.0}[style]
    assert lr_at(55, opt, sched, 100) == pytest.approx(mid, abs=0.01)
