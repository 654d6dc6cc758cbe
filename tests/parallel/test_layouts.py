"""Parameter layouts are declared by the layers: sharding, init, export and pipeline names read
them, and anything undeclared or unmapped is an error (no DeepSpeed processes, except one
single-process pipeline build in a subprocess)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.hf.adapters import from_hf, to_hf
from megatron.model.transformer import GPTModel, init_weights
from megatron.parallel.layers import (
    REPLICATED,
    SINGLE,
    Layout,
    TensorParallel,
    param_init_roles,
    param_layouts,
)
from megatron.parallel.sharding import shard_state, unshard_state
from tests.conftest import ROOT

VOCAB = 96
# Sizes divisible by 4 everywhere, so TP = 1, 2 and 4 all apply.
LLAMA_GQA = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=8,
    num_kv_heads=4,
    seq_length=16,
    activation="swiglu",
    norm="rmsnorm",
    use_bias_in_attn_linear=False,
    use_bias_in_mlp=False,
    no_weight_tying=True,
)
NEOX = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    seq_length=16,
    rotary_pct=0.25,
    gpt_j_residual=True,
)
NEOX_LEARNED = {**NEOX, "pos_emb": "learned", "use_bias_in_norms": False}
FAMILIES = {"llama_gqa": LLAMA_GQA, "neox": NEOX, "neox_learned_pos": NEOX_LEARNED}


def _model(spec: dict, tp: TensorParallel | None = None, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    m = ModelConfig(**spec)
    return GPTModel(m, SepLLMConfig(), VOCAB, tp=tp or TensorParallel())


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shard_then_unshard_round_trips_every_parameter(family: str, size: int) -> None:
    full = _model(FAMILIES[family])
    state, layouts = full.state_dict(), param_layouts(full)
    assert set(layouts) == set(state)
    pieces = [shard_state(state, layouts, r, size) for r in range(size)]
    for r, piece in enumerate(pieces):
        with torch.device("meta"):
            local = _model(FAMILIES[family], TensorParallel(size, r))
        shapes = {k: v.shape for k, v in local.state_dict().items()}
        assert {k: v.shape for k, v in piece.items()} == shapes
    back = unshard_state(pieces, layouts)
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_qkv_shard_holds_this_ranks_query_and_kv_heads() -> None:
    m = ModelConfig(**LLAMA_GQA)
    full = _model(LLAMA_GQA)
    w = full.state_dict()["blocks.0.attn.qkv.weight"]
    layout = param_layouts(full)["blocks.0.attn.qkv.weight"]
    assert layout == Layout("split", 0, m.qkv_sizes)
    q, k, v = w.split(list(m.qkv_sizes), 0)
    d, size = m.head_dim, 2
    for r in range(size):
        hq, hkv = m.num_attention_heads // size, m.kv_heads // size
        expected = torch.cat(
            [
                q[r * hq * d : (r + 1) * hq * d],
                k[r * hkv * d : (r + 1) * hkv * d],
                v[r * hkv * d : (r + 1) * hkv * d],
            ]
        )
        assert torch.equal(layout.shard(w, r, size), expected)


def test_layer_declarations() -> None:
    layouts = param_layouts(_model(NEOX_LEARNED))
    assert layouts["embedding.embed.weight"] == Layout("split", 0)
    assert layouts["embedding.pos_embed.weight"] == REPLICATED
    assert layouts["blocks.0.ln1.weight"] == REPLICATED
    assert layouts["blocks.0.attn.dense.weight"] == Layout("split", 1)
    assert layouts["blocks.0.attn.dense.bias"] == REPLICATED
    assert layouts["blocks.0.mlp.up.bias"] == Layout("split", 0)
    assert layouts["blocks.0.mlp.down.weight"] == Layout("split", 1)
    assert layouts["output.final_norm.weight"] == REPLICATED


def _legacy_init(model: nn.Module, m: ModelConfig) -> None:
    """The name-matching init this replaced (kept here to pin the random draws)."""
    h, n = m.hidden_size, m.num_layers
    in_std = math.sqrt(2.0 / (5.0 * h)) if m.init_method == "small_init" else m.init_method_std
    out_std = {
        "wang_init": 2.0 / n / math.sqrt(h),
        "scaled_normal": m.init_method_std / math.sqrt(2.0 * n),
        "normal": m.init_method_std,
    }[m.output_layer_init_method]
    for name, p in model.named_parameters():
        if p.dim() < 2:
            if "weight" in name and ("ln" in name or "norm" in name):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        elif name.endswith(("attn.dense.weight", "mlp.down.weight")):
            nn.init.normal_(p, 0.0, out_std)
        else:
            nn.init.normal_(p, 0.0, in_std)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_by_declared_roles_draws_what_name_matching_drew(family: str) -> None:
    m = ModelConfig(**FAMILIES[family])
    legacy, declared = _model(FAMILIES[family]), _model(FAMILIES[family])
    roles = param_init_roles(declared)
    assert list(roles) == [n for n, _ in declared.named_parameters()]  # init visits this order
    with torch.no_grad():
        torch.manual_seed(11)
        _legacy_init(legacy, m)
        torch.manual_seed(11)
        init_weights(declared, m)
    for k, v in legacy.state_dict().items():
        assert torch.equal(v, declared.state_dict()[k]), k
    assert roles["blocks.0.attn.dense.weight"] == roles["blocks.0.mlp.down.weight"] == "output"
    assert roles["blocks.0.ln1.weight"] == "ones"
    assert roles["blocks.0.attn.qkv.weight"] == "input"


class _Extra(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_undeclared_parameter_is_an_error() -> None:
    model = _model(NEOX)
    model.blocks[0].extra = _Extra()
    with pytest.raises(TypeError, match=r"blocks\.0\.extra\.proj\.weight \(Linear\)"):
        param_layouts(model)
    model = _model(NEOX)
    model.blocks[1].scale = nn.Parameter(torch.ones(3))  # owned by Block, which declares none
    with pytest.raises(TypeError, match=r"blocks\.1\.scale \(Block\)"):
        param_init_roles(model)


def test_shard_state_refuses_an_unknown_key() -> None:
    model = _model(NEOX)
    state = {**model.state_dict(), "blocks.0.attn.rogue": torch.zeros(2)}
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.rogue"):
        shard_state(state, param_layouts(model), 0, 2)


def test_layout_refuses_an_uneven_split() -> None:
    with pytest.raises(ValueError, match="does not split evenly"):
        Layout("split", 0).shard(torch.zeros(6, 2), 0, 4)
    with pytest.raises(ValueError, match="do not add up"):
        Layout("split", 0, (2, 2)).shard(torch.zeros(6, 2), 0, 2)


@pytest.mark.parametrize("family", ["llama_gqa", "neox"])
def test_to_hf_names_an_unmapped_key(family: str) -> None:
    m = ModelConfig(**FAMILIES[family])
    state = _model(FAMILIES[family]).state_dict()
    with pytest.raises(KeyError, match=r"to_hf: keys with no mapping: blocks\.1\.attn\.rogue"):
        to_hf({**state, "blocks.1.attn.rogue": torch.zeros(1)}, m)
    del state["blocks.0.mlp.up.weight"]
    with pytest.raises(KeyError, match=r"missing key blocks\.0\.mlp\.up\.weight"):
        to_hf(state, m)


def test_to_hf_refuses_a_learned_position_embedding() -> None:
    m = ModelConfig(**{**NEOX, "pos_emb": "learned"})
    state = GPTModel(m, SepLLMConfig(), VOCAB).state_dict()
    with pytest.raises(KeyError, match=r"embedding\.pos_embed\.weight"):
        to_hf(state, m)


@pytest.mark.parametrize("family", ["llama_gqa", "neox"])
def test_from_hf_names_an_unmapped_key(family: str) -> None:
    m = ModelConfig(**FAMILIES[family])
    hf = to_hf(_model(FAMILIES[family]).state_dict(), m)
    assert set(from_hf(hf, m)) == set(_model(FAMILIES[family]).state_dict())
    with pytest.raises(KeyError, match=r"from_hf: keys with no mapping: model\.extra\.weight"):
        from_hf({**hf, "model.extra.weight": torch.zeros(1)}, m)
    # Buffers older transformers versions saved are known and dropped.
    old = "gpt_neox.layers.0.attention.rotary_emb.inv_freq"
    assert set(from_hf({**hf, old: torch.zeros(1)}, m)) == set(from_hf(hf, m))


def test_pipeline_names_match_a_built_pipeline_module() -> None:
    """Every GPTModel parameter maps onto a distinct parameter of a real PipelineModule with
    the same shape, tied and untied (one process, one stage, in a fresh interpreter)."""
    script = textwrap.dedent(
        """
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
        from megatron.config import finalize
        from megatron.config.schema import Config, ModelConfig
        from megatron.model.transformer import GPTModel, init_weights
        from megatron.parallel.layers import SINGLE
        from megatron.training.distributed import init_distributed
        from megatron.training.pipeline import build_pipeline, pipe_names

        init_distributed()
        for tied in (True, False):
            m = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4,
                            num_kv_heads=2, seq_length=16, no_weight_tying=not tied)
            cfg = Config(model=m)
            cfg.data.data_path = "unused"
            cfg.training.train_micro_batch_size_per_gpu = 1
            cfg = finalize(cfg, world_size=1, vocab_size=100)
            pipe = build_pipeline(cfg, SINGLE, PipeModelDataParallelTopology(1, 1, 1), None)
            full = GPTModel(cfg.model, cfg.sepllm, cfg.derived.padded_vocab_size)
            shapes = {n: p.shape for n, p in full.named_parameters()}
            names = pipe_names(shapes, cfg)
            got = {n: p.shape for n, p in pipe.named_parameters()}
            assert sorted(got) == sorted(names.values()), (sorted(got), names)
            assert all(got[names[n]] == s for n, s in shapes.items())
        print("PIPE NAMES OK")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert "PIPE NAMES OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.parametrize("config", ["configs/tiny.yml", "configs/tiny_llama.yml"])
def test_piece_sources_follow_the_pipeline_pieces(config: str) -> None:
    """The checkpoint reader maps per-layer files through `piece_sources` (model section
    only); it must list the parameter-holding pieces in pipeline order (tied or untied)."""
    from megatron.checkpoint.layout import piece_sources
    from megatron.config.loader import load_config
    from megatron.config.validate import finalize
    from megatron.training.pipeline import pieces

    cfg = finalize(load_config([ROOT / config]), 1, 8192)
    want = [(p.source, p.cls.WRAPS) for p in pieces(cfg, SINGLE) if p.source]
    assert piece_sources(cfg.model) == want
