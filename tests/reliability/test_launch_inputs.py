"""Issue 22 (WEAK, launch): bad launch input is a one-line message, not a traceback, and the
launch config never goes through a planted symlink.

- `deepy.py configs/a.yml` (training script forgotten) ran the YAML as Python;
- `save` set to a file or a read-only directory: a raw traceback while writing the launch
  config; `python train.py` with a bad value: the ConfigError as a traceback;
- with `save` unset the launch config went to a predictable `/tmp/deepy-<uid>`, following a
  symlink planted there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

from megatron.config.loader import build_config, merge_sources
from megatron.launch import deepy
from megatron.training import main as train_main
from tests.conftest import MINIMAL_CONFIG, free_port


def config(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**MINIMAL_CONFIG, "master_port": free_port(), **kw}))
    return path


def test_forgotten_training_script_is_named(tmp_path: Path, capsys) -> None:
    cfg = config(tmp_path)
    assert deepy.main([str(cfg), "--set", "seed=1"]) == 2
    err = capsys.readouterr().err
    assert f"got the config {cfg}: python deepy.py train.py {cfg} --set seed=1" in err


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unwritable_save_is_a_message(tmp_path: Path, capsys, kind: str) -> None:
    save = tmp_path / "save"
    if kind == "file":
        save.write_text("not a directory")
    else:
        (save / "launch").mkdir(parents=True)
        os.chmod(save / "launch", 0o500)
        if os.access(save / "launch", os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
    assert deepy.main(["train.py", str(config(tmp_path, save=str(save)))]) == 2
    err = capsys.readouterr().err
    assert f"deepy.py: cannot write the launch config {save}/launch/config-" in err
    assert "(ENOTDIR)" in err if kind == "file" else "(EACCES)" in err
    assert "Traceback" not in err


def test_bad_value_under_train_py_is_a_message(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train_main.main([str(config(tmp_path, train_iters="many"))])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("train.py: ") and "train_iters" in err


def test_planted_symlink_at_the_default_config_dir_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / f"deepy-{os.getuid()}").symlink_to(victim)
    cfg = build_config(merge_sources([("t", MINIMAL_CONFIG)]))
    chosen = Path(deepy.config_dir(cfg, None))
    assert chosen.parent == tmp_path and chosen.name.startswith(f"deepy-{os.getuid()}-")
    assert not chosen.is_symlink() and (chosen.stat().st_mode & 0o077) == 0
    (tmp_path / f"deepy-{os.getuid()}").unlink()
    own = Path(deepy.config_dir(cfg, None))  # the usual directory, private, when it is ours
    assert own == tmp_path / f"deepy-{os.getuid()}" and (own.stat().st_mode & 0o777) == 0o700
