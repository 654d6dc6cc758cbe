"""TP=2, PP=2 and DP=2 with ZeRO 1/2/3 reproduce the single-process losses over 10 steps
(fp32, relative 1e-4), with full attention and with SepLLM; activation checkpointing is on in
two of the layouts. Real processes through deepy.py and the DeepSpeed launcher (gloo on CPU).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_cli, step_losses, write_config

pytestmark = pytest.mark.slow

LLAMA = {
    "activation": "swiglu",
    "norm": "rmsnorm",
    "num_kv_heads": 2,
    "no_weight_tying": True,
    "use_bias_in_attn_linear": False,
    "use_bias_in_mlp": False,
}
DP2 = {"num_gpus": 2, "gradient_accumulation_steps": 1}  # same global batch as 1 x 2 x 2
# layout name -> (model settings, which change the reference; run settings, which must not)
LAYOUTS: dict[str, tuple[dict, dict]] = {
    "tp2": ({}, {"model_parallel_size": 2, "num_gpus": 2}),
    "tp2_llama_gqa": (LLAMA, {"model_parallel_size": 2, "num_gpus": 2}),
    "pp2_tied_ckpt": ({}, {"pipe_parallel_size": 2, "num_gpus": 2, "checkpoint_activations": True}),
    "pp2_llama_untied": (LLAMA, {"pipe_parallel_size": 2, "num_gpus": 2}),
    **{
        f"dp2_zero{stage}": ({}, {**DP2, "zero_optimization": {"stage": stage}}) for stage in (1, 2)
    },
    "dp2_zero3_ckpt": (
        {},
        {**DP2, "zero_optimization": {"stage": 3}, "checkpoint_activations": True},
    ),
}


def _sepllm(shakespeare) -> dict:
    from megatron.data.tokenizers import tokenizer_for_file
    from megatron.sepllm.separators import separator_ids

    seps = separator_ids(tokenizer_for_file(shakespeare[1]))
    return {
        "sepllm": {
            "mode": "sepllm",
            "separator_token_ids": seps,
            "init_tokens": 4,
            "local_window": 8,
        }
    }


_REFERENCE: dict[tuple, dict[int, float]] = {}  # single-process losses, shared by layouts


def reference_losses(tmp_path: Path, shakespeare, common: dict) -> dict[int, float]:
    key = repr(sorted(common.items()))
    if key not in _REFERENCE:
        single = write_config(tmp_path, shakespeare, "single.yml", **common)
        run_cli(["train.py", str(single)])
        _REFERENCE[key] = step_losses(tmp_path / "single.yml.jsonl")
    return _REFERENCE[key]


@pytest.mark.parametrize("mode", ["full", "sepllm"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layout_matches_single_process(
    tmp_path: Path, shakespeare, layout: str, mode: str
) -> None:
    model, run = LAYOUTS[layout]
    common = dict(train_iters=10, hidden_dropout=0.0, **model)
    if mode == "sepllm":
        common.update(_sepllm(shakespeare))
    ref = reference_losses(tmp_path, shakespeare, common)
    multi = write_config(tmp_path, shakespeare, "multi.yml", **common, **run)
    out = run_cli(["deepy.py", "train.py", str(multi)])
    if (
        run.get("num_gpus") == 2
        and "model_parallel_size" not in run
        and "pipe_parallel_size" not in run
    ):
        sums = re.search(r"weight checksums per rank: (.*)", out.stdout + out.stderr)
        assert sums and len(set(sums.group(1).split())) == 1, "data-parallel replicas differ"
    got = step_losses(tmp_path / "multi.yml.jsonl")
    assert sorted(got) == list(range(1, 11))
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4), f"iteration {it}"
