"""Issue 22 (WEAK, resume): the data files a checkpoint's run read are recorded with it and a
resume on changed data says so, naming the file (it resumed silently); a ZeRO checkpoint
resumed at another data-parallel size is refused before anything is built, naming both sizes
and the ways out (it failed inside DeepSpeed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from megatron.config.loader import build_config, config_to_dict, merge_sources
from megatron.config.validate import finalize
from megatron.training import preflight
from megatron.training.checkpoint import COMPLETE, TRAINER_STATE
from tests.conftest import MINIMAL_CONFIG


def make_cfg(tmp_path: Path, world: int = 1, **kw):
    spec = {**MINIMAL_CONFIG, "data_path": str(tmp_path / "corpus"), "load": str(tmp_path / "ck")}
    return finalize(build_config(merge_sources([("t", {**spec, **kw})])), world, 1024)


def checkpoint_of(cfg, root: Path, data_files: dict) -> None:
    """A checkpoint directory as far as the resume comparison reads it."""
    step = root / "global_step4"
    step.mkdir(parents=True)
    (step / COMPLETE).write_text("4")
    (step / "config.yml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    shape = {"data_parallel_size": cfg.derived.data_parallel_size}
    state = {"iteration": 4, "run_shape": shape, "data_files": data_files}
    (step / TRAINER_STATE).write_text(json.dumps(state))
    (root / "latest").write_text("global_step4")


def test_changed_data_is_named_on_resume(tmp_path: Path, caplog) -> None:
    bin_file, idx = tmp_path / "corpus.bin", tmp_path / "corpus.idx"
    bin_file.write_bytes(bytes(range(200)) * 10)
    idx.write_bytes(b"index")
    cfg = make_cfg(tmp_path)
    recorded = preflight.data_fingerprints(cfg)
    assert set(recorded) == {str(bin_file), str(idx)}
    checkpoint_of(cfg, tmp_path / "ck", recorded)
    with caplog.at_level(logging.WARNING, logger="megatron"):
        assert preflight.resume_config_errors(cfg) == []
    assert "changed since" not in caplog.text  # same data: nothing said
    bin_file.write_bytes(bytes(range(1, 201)) * 10)  # same size, other tokens
    with caplog.at_level(logging.WARNING, logger="megatron"):
        assert preflight.resume_config_errors(cfg) == []
    assert f"data file {bin_file} changed since the checkpoint was saved" in caplog.text
    assert f"data file {idx} changed" not in caplog.text


def test_zero_checkpoint_at_another_data_parallel_size_is_refused(tmp_path: Path) -> None:
    zero = {"zero_optimization": {"stage": 1}}
    checkpoint_of(make_cfg(tmp_path, world=2, **zero), tmp_path / "ck", {})
    (err,) = preflight.resume_config_errors(make_cfg(tmp_path, world=1, **zero))
    assert "ZeRO stage 1 optimizer partitions for data-parallel size 2, this run has 1" in err
    assert "finetune: true" in err
    assert preflight.resume_config_errors(make_cfg(tmp_path, world=2, **zero)) == []
    weights_only = make_cfg(tmp_path, world=1, finetune=True, **zero)
    assert preflight.resume_config_errors(weights_only) == []
