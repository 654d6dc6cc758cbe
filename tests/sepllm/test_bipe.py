"""BiPE positions against hand-built segment tables, the model wired to them (embedding row =
intra-segment index, RoPE angle = inter-segment index), its parameter declaration, the
original keys and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron.config.schema import Config, ModelConfig, SepLLMConfig
from megatron.hf.export import check_sepllm_exportable, write_hf_folder
from megatron.model.transformer import BatchContext, GPTModel
from megatron.parallel.layers import REPLICATED, param_specs
from megatron.sepllm.aliases import apply_sepllm_aliases
from megatron.sepllm.bipe import bipe_errors, stream_positions, token_positions
from megatron.sepllm.info import build_kept_set

DOT, COMMA, PAD = 3, 4, 0


def segment_table(row: list[int], seps: set[int]) -> tuple[list[int], list[int]]:
    """(intra, inter) by walking the text: a separator closes its segment."""
    intra, inter, i, n = [], [], 0, 0
    for tok in row:
        intra.append(i)
        inter.append(n)
        i, n = (0, n + 1) if tok in seps else (i + 1, n)
    return intra, inter


def test_a_written_out_segment_table() -> None:
    ids = torch.tensor([[9, 8, DOT, 7, 6, COMMA, 5], [DOT, DOT, 9, 9, 9, COMMA, DOT]])
    pos = token_positions(ids, SepLLMConfig(bipe=True, separator_token_ids=[DOT, COMMA]))
    assert pos.embed.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3, 0]]
    assert pos.rope.tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2, 3]]


def test_random_rows_and_bipe_separator_ids_override() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 12, (4, 50), generator=g)
    sep = SepLLMConfig(bipe=True, separator_token_ids=[DOT], bipe_separator_token_ids=[5, 7])
    pos = token_positions(ids, sep)
    for b in range(4):
        intra, inter = segment_table(ids[b].tolist(), {5, 7})
        assert pos.embed[b].tolist() == intra and pos.rope[b].tolist() == inter
    plain = token_positions(ids, SepLLMConfig(separator_token_ids=[DOT]))
    assert plain.embed.tolist() == plain.rope.tolist() == list(range(50))


def test_left_padding_starts_each_text_after_its_pads() -> None:
    ids = torch.tensor([[PAD, PAD, 9, DOT, 9], [9, 9, DOT, 9, 9]])
    sep = SepLLMConfig(bipe=True, separator_token_ids=[DOT, PAD], batch_adaptive_init_pos=True)
    pos = token_positions(ids, sep)
    assert pos.embed.tolist() == [[0, 0, 0, 1, 0], [0, 1, 2, 0, 1]]
    assert pos.rope.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]]


def test_a_stream_in_steps_equals_the_whole_text() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 8, (3, 40), generator=g)
    sep = SepLLMConfig(bipe=True, separator_token_ids=[DOT, COMMA])
    whole = token_positions(ids, sep)
    state, got = None, []
    for a, b in [(0, 7), (7, 8), (8, 8), (8, 21), (21, 40)]:
        pos, state = stream_positions(ids[:, a:b], sep, state, None, max_positions=64)
        got.append(pos)
    assert torch.cat([p.embed for p in got], 1).tolist() == whole.embed.tolist()
    assert torch.cat([p.rope for p in got], 1).tolist() == whole.rope.tolist()
    # a left-padded step: padding counts for nothing
    padded = torch.cat([torch.full((3, 2), PAD), ids[:, :5]], 1)
    valid = torch.arange(7) >= 2
    fresh, _ = stream_positions(padded, sep, None, valid.expand(3, 7), max_positions=64)
    assert fresh.embed[:, 2:].tolist() == whole.embed[:, :5].tolist()
    assert fresh.rope[:, 2:].tolist() == whole.rope[:, :5].tolist()


def test_a_segment_longer_than_the_table_is_refused() -> None:
    sep = SepLLMConfig(bipe=True, separator_token_ids=[DOT])
    with pytest.raises(ValueError, match="without a separator.*8 rows"):
        stream_positions(torch.full((1, 9), 9), sep, None, None, max_positions=8)


def _model(bipe: bool, **model_kw) -> GPTModel:
    m = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24,
                    rotary_pct=0.5, **model_kw)  # fmt: skip
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=[DOT, COMMA], init_tokens=2,
                       local_window=4, bipe=bipe)  # fmt: skip
    torch.manual_seed(0)
    return GPTModel(m, sep, vocab_size=16).eval()


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_the_model_reads_intra_for_the_table_and_inter_for_rope(family: str) -> None:
    kw = {} if family == "neox" else dict(norm="rmsnorm", activation="swiglu", gpt_j_residual=False)
    model = _model(True, **kw)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 16, (2, 24), generator=g)
    intra = torch.tensor([segment_table(r, {DOT, COMMA})[0] for r in ids.tolist()])
    inter = torch.tensor([segment_table(r, {DOT, COMMA})[1] for r in ids.tolist()])
    with torch.no_grad():
        logits = model(ids)
        # by hand: token row + intra row of the table, rotary tables at the inter positions
        x = model.embedding.embed(ids) + model.embedding.pos_embed.weight[intra]
        ctx = BatchContext(model.context.rotary.cos_sin(inter, x.dtype),
                           build_kept_set(ids, model.sep), 24)  # fmt: skip
        for block in model.blocks:
            x = block(x, ctx)
        ref = model.output(x, model.embedding.embed.weight)
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=1e-6)
    # the positions matter: absolute positions give other logits
    with torch.no_grad():
        x = model.embedding.embed(ids) + model.embedding.pos_embed.weight[:24]
        ctx = BatchContext(model.context.rotary.cos_sin(torch.arange(24), x.dtype),
                           build_kept_set(ids, model.sep), 24)  # fmt: skip
        for block in model.blocks:
            x = block(x, ctx)
    assert (model.output(x, model.embedding.embed.weight) - logits).abs().max() > 1e-3


def test_the_intra_table_is_a_declared_replicated_parameter() -> None:
    specs = param_specs(_model(True))
    spec = specs["embedding.pos_embed.weight"]
    assert spec.layout == REPLICATED and spec.init == "input"
    model = _model(True)
    assert model.embedding.pos_embed.weight.shape == (model.cfg.max_positions, 32)
    assert "embedding.pos_embed.weight" not in param_specs(_model(False))


def test_pipeline_pieces_use_the_same_positions() -> None:
    from megatron.training.pipeline import BlockPipe, EmbeddingPipe

    model = _model(True)
    cfg = Config(model=model.cfg, sepllm=model.sep)
    emb = EmbeddingPipe(model.cfg, 16, model.embedding.embed.tp, model.sep)
    emb.load_state_dict(model.embedding.state_dict())
    blocks = [BlockPipe(cfg, b.window, b.attn.qkv.tp) for b in model.blocks]
    for pipe, block in zip(blocks, model.blocks, strict=True):
        pipe.block.load_state_dict(block.state_dict())
    ids = torch.randint(3, 16, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        act = emb.eval()(ids)
        for pipe in blocks:
            act = pipe.eval()(act)
        got = model.output(act[0], model.embedding.embed.weight)
        torch.testing.assert_close(got, model(ids), atol=1e-6, rtol=1e-6)


def test_original_keys_and_defaults() -> None:
    out = apply_sepllm_aliases({"USE_BiPE": True, "BiPE_seps": [15, 13]})
    assert out["bipe"] is True and out["bipe_separator_token_ids"] == [15, 13]
    # BiPE_seps absent or None (the original's default): segments end at separator_token_ids
    out = apply_sepllm_aliases({"USE_BiPE": True, "BiPE_seps": None, "separator_token_ids": [7]})
    sep = SepLLMConfig(**out)
    assert sep.bipe_separator_token_ids is None
    assert token_positions(torch.tensor([[1, 7, 1]]), sep).rope.tolist() == [[0, 0, 1]]
    with pytest.raises(ValueError, match="true or false"):
        apply_sepllm_aliases({"USE_BiPE": "yes"})


def test_config_errors_and_export_refusals() -> None:
    sep = SepLLMConfig(bipe=True)
    assert any("needs segment separators" in e for e in bipe_errors(sep, "rotary"))
    sep = SepLLMConfig(bipe=True, separator_token_ids=[DOT])
    assert bipe_errors(sep, "rotary") == []
    assert any("ALiBi is not built" in e for e in bipe_errors(sep, "learned"))
    bad = SepLLMConfig(bipe=True, bipe_separator_token_ids=[-1, DOT])
    assert any("negative ids" in e for e in bipe_errors(bad, "rotary"))
    with pytest.raises(ValueError, match="BiPE.*cannot be exported"):
        check_sepllm_exportable(sep)
    with pytest.raises(ValueError, match="BiPE.*cannot be exported"):  # before anything is read
        write_hf_folder(Path("never-written"), {}, ModelConfig(), sep, "fp32", {})
    with pytest.raises(ValueError, match="Self-Adjust softmax.*cannot be exported"):
        check_sepllm_exportable(SepLLMConfig(attention_kernel="sa_no_deno"))
    check_sepllm_exportable(SepLLMConfig(mode="sepllm", separator_token_ids=[DOT]))


def test_decode_in_steps_equals_the_full_forward() -> None:
    """Chunked prefill + token-by-token decode over a cache that keeps everything: the same
    logits as one forward (positions continue the text's segments from step to step)."""
    from megatron.inference.caches import StreamCache, make_policies

    model = _model(True)
    ids = torch.randint(3, 16, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = StreamCache(make_policies("full", 2), [DOT, COMMA], pos_shift=False)
        steps = [
            model(ids[:, a:b], cache=cache)
            for a, b in [(0, 9), *[(t, t + 1) for t in range(9, 20)]]
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    shifted = StreamCache(make_policies("full", 2), [DOT, COMMA], pos_shift=True)
    with pytest.raises(ValueError, match="BiPE over a cache needs pos_shift off"):
        model(ids, cache=shifted)


def test_bipe_ids_outside_the_vocabulary_are_refused_when_used() -> None:
    from megatron.config.loader import ConfigError
    from megatron.config.validate import finalize
    from tests.conftest import MINIMAL_CONFIG

    def cfg(**sep):
        c = Config(model=ModelConfig(**{k: MINIMAL_CONFIG[k] for k in (
            "num_layers", "hidden_size", "num_attention_heads", "seq_length")}))  # fmt: skip
        c.sepllm = SepLLMConfig(mode="sepllm", separator_token_ids=[DOT], **sep)
        c.training.train_micro_batch_size_per_gpu = 2
        c.data.data_path = "unused"
        return c

    with pytest.raises(ConfigError, match=r"bipe_separator_token_ids \[300\] are outside"):
        finalize(cfg(bipe=True, bipe_separator_token_ids=[DOT, 300]), 1, 100)
    finalize(cfg(bipe=False, bipe_separator_token_ids=[DOT, 300]), 1, 100)  # not used: fine
