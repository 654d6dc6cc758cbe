"""HF -> ours -> HF with the two documented commands (docs/hf.md), no training in between:
the imported checkpoint is one every tool reads as it is. For a tied + GQA Llama and an
untied GPT-NeoX with partial rotary and parallel residual: the exported folder's logits equal
the original's (<= 1e-5), its tokenizer gives the same ids on a probe text, and the imported
checkpoint's streaming perplexity (full cache, tools/streaming/evaluate_ppl.py) equals the
original transformers model's perplexity on the same text, and eval.py's adapter scores a
continuation as the transformers model does."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron.config.schema import ModelConfig
from megatron.hf.adapters import family, hf_config
from tests.conftest import ROOT, run_cli
from tests.inference.fixtures import TEXT, char_tokenizer

VOCAB = 256
COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=128)
MODELS = {
    "llama_tied_gqa": dict(
        COMMON, num_kv_heads=2, norm="rmsnorm", activation="swiglu", intermediate_size=64,
        use_bias_in_attn_linear=False, use_bias_in_mlp=False, use_bias_in_norms=False,
    ),
    "neox_untied_partial_parallel": dict(
        COMMON, rotary_pct=0.25, gpt_j_residual=True, no_weight_tying=True,
    ),
}  # fmt: skip
PROBE = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
STREAM = TEXT[:100]  # shorter than seq_length: one window, nothing evicted


def _module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hf_folder(folder: Path, spec: dict) -> Path:
    from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    m = ModelConfig(**spec)
    cls = LlamaForCausalLM if family(m) == "llama" else GPTNeoXForCausalLM
    cls(hf_config(m, VOCAB)).save_pretrained(str(folder))
    char_tokenizer().save_pretrained(str(folder))
    return folder


def _round_trip(name: str, hf_in: Path, tmp: Path) -> Path:
    """The two commands of docs/hf.md: for the Llama the import runs as a subprocess (as a
    user runs it); the rest call the same CLIs' main(argv) in process (an interpreter
    start-up costs ~25 s on the shared 2-core CI machine)."""
    ours, hf_out = tmp / "ours", tmp / "hf_out"
    arch = "llama" if name.startswith("llama") else "neox"
    first = ["--input_dir", str(hf_in), "--output_dir", str(ours)]
    second = ["--input_dir", str(ours), "--output_dir", str(hf_out), "--architecture", arch]
    if arch == "llama":
        run_cli(["tools/ckpts/convert_hf_to_neox.py", *first])
    else:
        assert _module("hf_to_neox", "tools/ckpts/convert_hf_to_neox.py").main(first) == 0
    assert _module("neox_to_hf", "tools/ckpts/convert_neox_to_hf.py").main(second) == 0
    return hf_out


def _hf_ppl(folder: Path, text: str) -> float:
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_to_ours_to_hf_by_the_documented_commands(name: str, tmp_path: Path) -> None:
    hf_in = _hf_folder(tmp_path / "hf_in", MODELS[name])
    hf_out = _round_trip(name, hf_in, tmp_path)
    tok_in = AutoTokenizer.from_pretrained(str(hf_in))
    tok_out = AutoTokenizer.from_pretrained(str(hf_out))
    ids = tok_in(PROBE)["input_ids"]
    assert tok_out(PROBE)["input_ids"] == ids
    models = [AutoModelForCausalLM.from_pretrained(str(f)).eval() for f in (hf_in, hf_out)]
    with torch.no_grad():
        want, got = (m(torch.tensor([ids])).logits for m in models)
    assert (got - want).abs().max().item() <= 1e-5

    text = tmp_path / "text.txt"
    text.write_text(STREAM)
    evaluate_ppl = _module("evaluate_ppl_25", "tools/streaming/evaluate_ppl.py")
    argv = ["--model_name_or_path", str(tmp_path / "ours"), "--dataset_name", str(text)]
    full = ["--enable_kv_cache_manager", "False", "--enable_SepLLM", "False"]
    full += ["--output_dir", str(tmp_path / "ppl")]
    summary = evaluate_ppl.main([*argv, *full])
    assert summary["ppl"] == pytest.approx(_hf_ppl(hf_in, STREAM), rel=1e-5)

    from megatron.eval.lm import SepneoxLM  # eval.py's adapter over the imported checkpoint

    lm = SepneoxLM(path=str(tmp_path / "ours"))
    context, continuation = ids[:20], ids[20:30]
    logp = torch.log_softmax(models[0](torch.tensor([ids[:30]])).logits[0, :-1], -1)
    want_ll = logp[19:29].gather(1, torch.tensor(continuation)[:, None]).sum().item()
    assert lm._score(context, continuation)[0] == pytest.approx(want_ll, abs=1e-4)
