"""attn_implementation="sepllm" in stock transformers reproduces our SepLLM / StreamingLLM
model: logits on real text, greedy decoding through the KV cache, and the validation loss
the trainer logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from megatron.checkpoint import open_checkpoint
from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.config.validate import finalize
from megatron.data.builder import build_train_valid_test_datasets
from megatron.data.tokenizers import build_tokenizer, tokenizer_for_file
from megatron.hf.adapters import hf_config, to_hf
from megatron.hf.sepllm_attention import apply_sepllm
from megatron.model.transformer import GPTModel
from megatron.sepllm.separators import separator_ids
from megatron.training.setup import sample_counts

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved."
)


def _ours(ckpt: Path, sep: SepLLMConfig | None = None) -> tuple[GPTModel, object]:
    ck = open_checkpoint(ckpt)
    model = GPTModel(
        ck.cfg.model, sep or ck.cfg.sepllm, ck.state_dict()["embedding.embed.weight"].shape[0]
    )
    model.load_state_dict(ck.state_dict())
    return model.eval(), ck


def _ids(tokenizer_file: str, n: int) -> torch.Tensor:
    return torch.tensor([tokenizer_for_file(tokenizer_file).tokenize(TEXT)[:n]])


def _sepllm(folder: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    apply_sepllm(model)  # the config's sepllm entry
    return model.eval()


def test_exported_sepllm_model_matches_ours(sepllm_ckpt: Path, exported: Path) -> None:
    ours, ck = _ours(sepllm_ckpt)
    full, _ = _ours(sepllm_ckpt, SepLLMConfig())
    theirs = _sepllm(exported)
    ids = _ids(ck.cfg.data.vocab_file, 64)
    with torch.no_grad():
        got, want = theirs(ids).logits, ours(ids)
        assert (got - want).abs().max().item() <= 1e-4
        assert (got - full(ids)).abs().max().item() > 1e-2  # the kept set really differs
    prompt = ids[:, :16]
    out = theirs.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    with torch.no_grad():
        for _ in range(32):
            prompt = torch.cat([prompt, ours(prompt)[:, -1:].argmax(-1)], 1)
    assert out[0].tolist() == prompt[0].tolist()


def test_streamingllm_training_free_on_the_exported_model(
    sepllm_ckpt: Path, exported: Path
) -> None:
    sep = SepLLMConfig(mode="streamingllm", init_tokens=3, local_window=6)
    ours, ck = _ours(sepllm_ckpt, sep)
    theirs = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    apply_sepllm(theirs, [], init_tokens=3, local_window=6, mode="streamingllm")
    ids = _ids(ck.cfg.data.vocab_file, 64)
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_training_free_on_a_transformers_llama(shakespeare: tuple[str, str]) -> None:
    """Any Llama (here GQA, random weights): separator ids, a and w passed in."""
    torch.manual_seed(0)
    m = ModelConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, seq_length=64,
        activation="swiglu", norm="rmsnorm", use_bias_in_attn_linear=False,
        use_bias_in_mlp=False, no_weight_tying=True, rotary_emb_base=5e5,
    )  # fmt: skip
    seps = separator_ids(tokenizer_for_file(shakespeare[1]))
    sep = SepLLMConfig(mode="sepllm", separator_token_ids=seps, init_tokens=2, local_window=5)
    ours = GPTModel(m, sep, 1024).eval()
    theirs = LlamaForCausalLM(hf_config(m, 1024)).eval()
    theirs.load_state_dict(to_hf(ours.state_dict(), m))
    apply_sepllm(theirs, seps, init_tokens=2, local_window=5)
    ids = _ids(shakespeare[1], 64)
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_exported_model_reproduces_the_logged_validation_loss(
    sepllm_ckpt: Path, exported: Path
) -> None:
    """The trainer's last evaluation (iteration 2, the first one: samples from 0) on the same
    validation batches, recomputed by the transformers model."""
    ck = open_checkpoint(sepllm_ckpt)
    cfg = ck.cfg
    finalize(cfg, 1, build_tokenizer(cfg.data).vocab_size)
    _, valid, _ = build_train_valid_test_datasets(
        cfg.data, cfg.model.seq_length, cfg.training.seed, sample_counts(cfg), vocab_size=1024
    )
    d = cfg.derived
    theirs, losses = _sepllm(exported), []
    for b in range(cfg.logging.eval_iters * d.grad_accum):
        rows = range(b * d.micro_batch, (b + 1) * d.micro_batch)
        tokens = torch.stack([torch.as_tensor(valid[i]["text"], dtype=torch.long) for i in rows])
        with torch.no_grad():
            logits = theirs(tokens[:, :-1]).logits
        losses.append(
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        )
    jsonl = Path(cfg.logging.metrics_jsonl)
    logged = [
        json.loads(r)["valid/loss"] for r in jsonl.read_text().splitlines() if "valid/loss" in r
    ]
    assert float(torch.stack(losses).mean()) == pytest.approx(logged[-1], abs=1e-4)
