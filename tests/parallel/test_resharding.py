"""A checkpoint saved at one TP/PP layout resumes at another with the same losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli, step_losses, write_config

pytestmark = pytest.mark.slow

TP2_PP2 = {"model_parallel_size": 2, "pipe_parallel_size": 2, "num_gpus": 4}
SINGLE = {"model_parallel_size": 1, "pipe_parallel_size": 0, "num_gpus": 1}
COMMON = {"train_iters": 8, "hidden_dropout": 0.0}


def _run(tmp_path: Path, shakespeare, name: str, layout: dict, **kw) -> str:
    cfg = write_config(tmp_path, shakespeare, name, **COMMON, **layout, **kw)
    out = run_cli(["deepy.py", "train.py", str(cfg)], timeout=600)
    return out.stdout + out.stderr


@pytest.mark.parametrize(("first", "second"), [(TP2_PP2, SINGLE), (SINGLE, TP2_PP2)])
def test_resume_at_another_layout(tmp_path: Path, shakespeare, first: dict, second: dict):
    _run(tmp_path, shakespeare, "ref.yml", SINGLE)
    ref = step_losses(tmp_path / "ref.yml.jsonl")
    ck = str(tmp_path / "ck")
    _run(tmp_path, shakespeare, "a.yml", first, save=ck, exit_interval=4)
    log = _run(tmp_path, shakespeare, "b.yml", second, save=ck, load=ck)
    assert "resharded from" in log
    got = {**step_losses(tmp_path / "a.yml.jsonl"), **step_losses(tmp_path / "b.yml.jsonl")}
    assert sorted(got) == list(range(1, 9))
    for it in ref:
        assert got[it] == pytest.approx(ref[it], rel=1e-4), f"iteration {it}"


def test_layout_change_without_full_state_is_refused(tmp_path: Path, shakespeare) -> None:
    ck = str(tmp_path / "ck")
    zero1 = {"zero_optimization": {"stage": 1}}
    _run(tmp_path, shakespeare, "a.yml", SINGLE, save=ck, exit_interval=2, **zero1)
    cfg = write_config(
        tmp_path,
        shakespeare,
        "b.yml",
        **COMMON,
        **zero1,
        save=ck,
        load=ck,
        model_parallel_size=2,
        num_gpus=2,
    )
    with pytest.raises(AssertionError, match="without a layout-independent copy"):
        run_cli(["deepy.py", "train.py", str(cfg)])


def test_pipeline_name_lookup_leaves_the_random_stream_alone() -> None:
    """Pipeline saves and loads look up the single-device names; that must not reseed torch
    (it would change dropout after every checkpoint) and must name build_model's parameters."""
    from megatron.config.loader import load_config
    from megatron.config.validate import finalize
    from megatron.training import universal
    from megatron.training.setup import build_model

    cfg = finalize(load_config([ROOT / "configs/tiny.yml"]), 1, 8192)
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    names = universal._full_param_names(cfg)
    assert torch.equal(torch.rand(4), want)
    with torch.device("meta"):
        assert names == [k for k, _ in build_model(cfg).named_parameters()]
