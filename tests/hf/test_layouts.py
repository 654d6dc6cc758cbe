"""Every layout the trainer writes converts, and gives the single-process run's HF logits;
the loader of generate.py / tools/streaming/evaluate_ppl.py / eval.py (megatron.inference.
loading over open_checkpoint) gives the single-process run's logits and streaming perplexity.

Real gloo processes through deepy.py (slow); the single-process reference is the shared
SepLLM checkpoint of conftest.py, trained with the same model, data, seed and global batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from convert_neox_to_hf import convert, parse_args
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megatron.checkpoint import open_checkpoint
from megatron.config.schema import SepLLMConfig
from megatron.data.tokenizers import tokenizer_for_file
from megatron.inference.loading import load_model
from megatron.model.transformer import GPTModel
from tests.conftest import run_cli, write_config
from tests.hf.conftest import MODEL, sepllm_overrides

DP2 = {"num_gpus": 2, "gradient_accumulation_steps": 1}  # same global batch as 1 x 2 x 2
TP2 = {"model_parallel_size": 2, "num_gpus": 2}
PP2 = {"pipe_parallel_size": 2, "num_gpus": 2}
# Each layout reads its weights from a different source (megatron/checkpoint/weights.py):
# the universal copy (ZeRO 0 fp32, any TP x PP; also the single-process reference),
# zero_to_fp32 per tensor-parallel rank, or the pipeline's per-layer files.
LAYOUTS = {
    "tp2_zero1": ({**TP2, "zero_optimization": {"stage": 1}}, "zero_to_fp32"),
    "tp2_zero3": ({**TP2, "zero_optimization": {"stage": 3}}, "zero_to_fp32"),
    "pp2_zero1": ({**PP2, "zero_optimization": {"stage": 1}}, "pipeline layer files"),
    "dp2_zero2": ({**DP2, "zero_optimization": {"stage": 2}}, "zero_to_fp32"),
    "dp2_zero3": ({**DP2, "zero_optimization": {"stage": 3}}, "zero_to_fp32"),
}
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def _train(tmp: Path, shakespeare: tuple[str, str], launcher: str, **kw: object) -> Path:
    tmp.mkdir(exist_ok=True)
    save = tmp / "ckpt"
    cfg = write_config(
        tmp, shakespeare, train_iters=2, checkpoint_factor=2, eval_interval=2, eval_iters=1,
        save=str(save), **{**MODEL, **sepllm_overrides(shakespeare[1]), **kw},
    )  # fmt: skip
    run_cli([launcher, "train.py", str(cfg)] if launcher == "deepy.py" else ["train.py", str(cfg)])
    return save


def _export(ckpt: Path, out: Path) -> Path:
    convert(parse_args(["--input_dir", str(ckpt), "--output_dir", str(out)]))
    return out


def _logits(folder: Path, tokenizer: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    ids = torch.tensor([tokenizer_for_file(tokenizer).tokenize(TEXT)[:48]])
    with torch.no_grad():
        return model.eval()(ids).logits.float()


@pytest.fixture(scope="module")
def reference(sepllm_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(sepllm_ckpt, tmp_path_factory.mktemp("ref") / "hf")


def _tool_outputs(ckpt: Path, tokenizer: str, tmp: Path) -> tuple[torch.Tensor, float]:
    """Our model's logits as generate / eval's sepneox load it, and evaluate_ppl's full-cache
    perplexity of TEXT."""
    import importlib.util

    from tests.conftest import ROOT

    tool = ROOT / "tools" / "streaming" / "evaluate_ppl.py"
    spec = importlib.util.spec_from_file_location("ppl_layouts", tool)
    evaluate_ppl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_ppl)
    ids = torch.tensor([tokenizer_for_file(tokenizer).tokenize(TEXT)[:48]])
    with torch.no_grad():
        logits = load_model(str(ckpt)).model(ids)
    (tmp / "text.txt").write_text(TEXT)
    argv = ["--model_name_or_path", str(ckpt), "--dataset_name", str(tmp / "text.txt")]
    full = ["--enable_kv_cache_manager", "False", "--enable_SepLLM", "False"]
    full += ["--output_dir", str(tmp / "ppl")]
    return logits, evaluate_ppl.main([*argv, *full])["ppl"]


@pytest.fixture(scope="module")
def reference_tools(
    sepllm_ckpt: Path, shakespeare: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.Tensor, float]:
    return _tool_outputs(sepllm_ckpt, shakespeare[1], tmp_path_factory.mktemp("ref_tools"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layout_converts_to_the_same_model(
    layout: str,
    reference: Path,
    reference_tools: tuple[torch.Tensor, float],
    shakespeare: tuple[str, str],
    tmp_path: Path,
) -> None:
    options, source = LAYOUTS[layout]
    ckpt = _train(tmp_path, shakespeare, "deepy.py", **options)
    assert open_checkpoint(ckpt).source == source
    got = _logits(_export(ckpt, tmp_path / "hf"), shakespeare[1])
    want = _logits(reference, shakespeare[1])
    assert (got - want).abs().max().item() <= 1e-4
    logits, ppl = _tool_outputs(ckpt, shakespeare[1], tmp_path)
    assert (logits - reference_tools[0]).abs().max().item() <= 1e-4
    assert ppl == pytest.approx(reference_tools[1], rel=1e-4)


@pytest.mark.slow
def test_bf16_checkpoint_converts_in_bf16(shakespeare: tuple[str, str], tmp_path: Path) -> None:
    """bf16 with ZeRO 2 (the bf16 layout the trainer supports on CPU): exported in bf16, its
    logits equal our model's on the same (bf16-rounded) weights."""
    ckpt = _train(tmp_path, shakespeare, "train.py", precision="bfloat16",
                  zero_optimization={"stage": 2})  # fmt: skip
    folder = _export(ckpt, tmp_path / "hf")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    ck = open_checkpoint(ckpt)
    ours = GPTModel(ck.cfg.model, SepLLMConfig(), 1024).eval()
    ours.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ck.state_dict().items()})
    ids = torch.tensor([tokenizer_for_file(shakespeare[1]).tokenize(TEXT)[:48]])
    with torch.no_grad():
        want = ours(ids)
    got = _logits(folder, shakespeare[1], torch.float32)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_bf16_tp2_and_pp2_merge_the_module_files(
    shakespeare: tuple[str, str], tmp_path: Path
) -> None:
    """bf16 at ZeRO 1 (DeepSpeed's BF16 optimizer, whose files zero_to_fp32 cannot read)
    exports the bf16 module weights: TP=2 merges the two mp_rank files by the layers'
    layouts, PP=2 reads the per-layer files. Against the single-process bf16 run with the
    same optimizer, to bf16 tolerance (the runs round differently in training; a wrong merge
    is off by O(1))."""
    bf16 = {"precision": "bfloat16", "zero_optimization": {"stage": 1}}
    single = _train(tmp_path / "single", shakespeare, "train.py", **bf16)
    want = _logits(_export(single, tmp_path / "hf1"), shakespeare[1])
    for name, (options, source) in {
        "tp2": (TP2, "mp_rank model states"),
        "pp2": (PP2, "pipeline layer files"),
    }.items():
        ckpt = _train(tmp_path / name, shakespeare, "deepy.py", **bf16, **options)
        assert open_checkpoint(ckpt).source == source
        got = _logits(_export(ckpt, tmp_path / f"hf_{name}"), shakespeare[1])
        diff = (got - want).abs().max().item()
        print(f"bf16 {name}: max |logit diff| {diff:.4f} (logits up to {want.abs().max():.2f})")
        assert diff <= 5e-2 * max(1.0, want.abs().max().item()), name
