"""Reliability case 3: a fresh run never writes over another run's checkpoints.

A run into a save directory that already holds checkpoints is refused before training unless it
resumes from it (load == save) or overwrite_checkpoints: true says to delete them first. The
tiny configs set load == save, so rerunning the main job resumes (and ends at once).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.config.loader import build_config, merge_sources
from megatron.config.validate import finalize
from megatron.training import preflight
from megatron.training.checkpoint import COMPLETE
from tests.conftest import run_cli, write_config

BASE = {"train_micro_batch_size_per_gpu": 2, "data_path": "data/x"}


def used_dir(root: Path) -> Path:
    (root / "global_step4").mkdir(parents=True)
    (root / "global_step4" / COMPLETE).write_text("4")
    (root / "latest").write_text("global_step4")
    return root


def cfg(**kw):
    return finalize(build_config(merge_sources([("test", {**BASE, **kw})])), 1, 1024)


def test_fresh_run_into_used_save_dir_is_refused(tmp_path: Path) -> None:
    ck = used_dir(tmp_path / "ck")
    (err,) = preflight.fresh_run_errors(cfg(save=str(ck)))
    assert f"save = {ck} already holds checkpoints (2 entries, latest = global_step4)" in err
    assert "overwrite_checkpoints: true" in err and "load:" in err


def test_resume_from_save_and_other_directories_are_allowed(tmp_path: Path) -> None:
    ck = used_dir(tmp_path / "ck")
    assert preflight.fresh_run_errors(cfg(save=str(ck), load=str(ck))) == []
    assert preflight.fresh_run_errors(cfg(save=str(tmp_path / "new"))) == []


def test_finetune_into_its_own_source_is_refused(tmp_path: Path) -> None:
    ck = used_dir(tmp_path / "ck")
    spec = {"save": str(ck), "load": str(ck), "finetune": True, "overwrite_checkpoints": True}
    (err,) = preflight.fresh_run_errors(cfg(**spec))
    assert "also the finetune source" in err
    preflight.clear_for_overwrite(cfg(**spec))
    assert (ck / "global_step4" / COMPLETE).is_file()  # never deleted


def test_overwrite_deletes_the_old_checkpoints_before_the_first_step(tmp_path: Path) -> None:
    ck = used_dir(tmp_path / "ck")
    c = cfg(save=str(ck), overwrite_checkpoints=True)
    assert preflight.fresh_run_errors(c) == []
    preflight.clear_for_overwrite(c)
    assert list(ck.iterdir()) == []


@pytest.mark.slow
def test_second_fresh_run_stops_before_training_and_keeps_latest(
    tmp_path: Path, shakespeare
) -> None:
    first = write_config(tmp_path, shakespeare, "a.yml", save=str(tmp_path / "ck"), train_iters=2)
    run_cli(["train.py", str(first)])
    second = write_config(tmp_path, shakespeare, "b.yml", save=str(tmp_path / "ck"), train_iters=1)
    with pytest.raises(AssertionError) as exc:
        run_cli(["train.py", str(second)])
    assert "already holds checkpoints" in str(exc.value)
    assert "iter      1/1" not in str(exc.value)
    assert (tmp_path / "ck" / "latest").read_text() == "global_step2"
    held = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert held == [preflight.RUN_LOCK, "global_step2", "latest"]  # the lock file stays, empty


def test_rerunning_the_main_job_resumes_instead_of_being_refused() -> None:
    from megatron.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("tiny.yml", "tiny_llama.yml"):
        ck = load_config([root / name]).checkpoint
        assert ck.load == ck.save and ck.allow_fresh_start, name
