"""Reliability case 4: the run's directories and free space are checked before the first step.

Save, load, data prefixes, data_cache_dir, tensorboard_dir, the wandb directory and
metrics_jsonl are probed with a real write (so this holds for root too), every problem is
listed at once with its path; the free space of the save directory is compared with an
estimate of one checkpoint (calibrated on a real one); a save that fails anyway says where,
why (ENOSPC) and what `latest` still names.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import yaml

from megatron.config.loader import build_config, merge_sources
from megatron.config.validate import finalize
from megatron.training import checkpoint, preflight
from tests.conftest import MINIMAL_CONFIG, run_cli, write_config


def make_cfg(tmp_path: Path, **kw):
    prefix = tmp_path / "data" / "corpus"
    prefix.parent.mkdir(exist_ok=True)
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(b"")
    cfg = build_config(
        merge_sources([("test", {**MINIMAL_CONFIG, "data_path": str(prefix), **kw})])
    )
    return finalize(cfg, 1, 1024)


def test_every_unusable_directory_is_reported_with_its_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = make_cfg(
        tmp_path,
        save=str(blocker / "ck"),
        data_cache_dir=str(blocker / "cache"),
        tensorboard_dir=str(blocker / "tb"),
        metrics_jsonl=str(tmp_path),  # a directory
        use_wandb=True,
        wandb_dir=str(blocker / "wandb"),
        valid_data_paths=[str(tmp_path / "missing")],
    )
    errors = preflight.directory_errors(cfg, rank=0)
    text = "\n".join(errors)
    for key in ("save", "data_cache_dir", "tensorboard_dir", "wandb_dir"):
        assert re.search(rf"{key} = {re.escape(str(blocker))}/\w+: .*\(ENOTDIR\)", text), text
    assert f"metrics_jsonl = {tmp_path}: is a directory" in text
    assert f"valid_data_paths: {tmp_path / 'missing'}.bin does not exist (ENOENT)" in text
    assert len(errors) == 7  # all at once, .bin and .idx of the missing prefix


def test_usable_directories_pass_and_are_created(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, save=str(tmp_path / "new" / "ck"), tensorboard_dir=str(tmp_path / "tb")
    )
    assert preflight.directory_errors(cfg, rank=0) == []
    assert (tmp_path / "new" / "ck").is_dir() and not list((tmp_path / "new" / "ck").iterdir())


def test_too_little_free_space_is_refused(tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg(tmp_path, save=str(tmp_path / "ck"))
    (tmp_path / "ck").mkdir()
    need = preflight.estimate_checkpoint_bytes(cfg)
    free = type("Usage", (), {"free": need // 2})()  # only .free is read
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: free)
    (err,) = preflight.free_space_errors(cfg)
    assert f"save = {tmp_path / 'ck'}" in err and "MiB free" in err and "ENOSPC" in err


def test_failed_save_names_path_errno_and_what_latest_still_names(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    (root / "latest").write_text("global_step4")
    target = root / "global_step8"
    with pytest.raises(checkpoint.CheckpointError) as exc:
        with checkpoint._explain_os_error(root, target):
            raise OSError(errno.ENOSPC, "No space left on device", str(target / "x.pt"))
    text = str(exc.value)
    assert f"saving checkpoint {target} failed: No space left on device (ENOSPC)" in text
    assert "MiB free on" in text and "`latest` still names global_step4" in text


@pytest.mark.slow
def test_estimate_matches_a_real_checkpoint_and_bad_save_fails_before_step_one(
    tmp_path: Path, shakespeare
) -> None:
    cfg_path = write_config(tmp_path, shakespeare, save=str(tmp_path / "ck"), train_iters=1)
    run_cli(["train.py", str(cfg_path)])
    step = tmp_path / "ck" / "global_step1"
    real = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
    cfg = build_config(merge_sources([("c", yaml.safe_load(cfg_path.read_text()))]))
    finalize(cfg, 1, 1024)
    assert preflight.estimate_checkpoint_bytes(cfg) == pytest.approx(real, rel=0.05)

    (tmp_path / "blocker").write_text("")
    bad = write_config(tmp_path, shakespeare, "bad.yml", save=str(tmp_path / "blocker" / "ck"))
    with pytest.raises(AssertionError) as exc:
        run_cli(["train.py", str(bad)])
    out = str(exc.value)
    assert "pre-flight check failed before the first step" in out
    assert f"save = {tmp_path / 'blocker' / 'ck'}" in out and "ENOTDIR" in out
    assert "iter      1/" not in out  # no step was trained
