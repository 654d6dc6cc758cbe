"""TP=2 and PP=2 runs reproduce the single-process losses (fp32), full attention and SepLLM.

Real processes through the DeepSpeed launcher (gloo on CPU). Data parallelism with ZeRO 0-3 is
covered in tests/test_training.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_training import step_losses, write_config

pytestmark = pytest.mark.slow

LLAMA = {
    "activation": "swiglu",
    "norm": "rmsnorm",
    "num_kv_heads": 2,
    "no_weight_tying": True,
    "use_bias_in_attn_linear": False,
    "use_bias_in_mlp": False,
}
LAYOUTS = {
    "tp2": {"model_parallel_size": 2},
    "tp2_llama_gqa": {"model_parallel_size": 2, **LLAMA},
    "pp2_tied": {"pipe_parallel_size": 2},
    "pp2_llama_untied": {"pipe_parallel_size": 2, **LLAMA},
}


def _sepllm(shakespeare) -> dict:
    from megatron.sepllm.separators import separator_ids_for_file

    seps = [t.id for t in separator_ids_for_file(shakespeare[1])]
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
    extra = {k: v for k, v in LAYOUTS[layout].items() if "parallel" not in k}
    common = dict(train_iters=10, hidden_dropout=0.0, **extra)
    if mode == "sepllm":
        common.update(_sepllm(shakespeare))
    ref = reference_losses(tmp_path, shakespeare, common)
    parallel = {k: v for k, v in LAYOUTS[layout].items() if "parallel" in k}
    multi = write_config(tmp_path, shakespeare, "multi.yml", num_gpus=2, **common, **parallel)
    run_cli(["deepy.py", "train.py", str(multi)])
    got = step_losses(tmp_path / "multi.yml.jsonl")
    assert sorted(got) == list(range(1, 11))
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4), f"iteration {it}"
