"""deepy.py in NeoX's command forms, in process: -d/--conf_dir, a missing hostfile on one node
(DeepSpeed's warning, then a local run), and --dry-run noticing a missing pdsh."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest

from megatron.launch import deepy

HERE = Path(__file__).resolve().parent
NEOX = ["train.py", "-d", str(HERE), "neox_pythia.yml", "neox_setup.yml", "--dry-run"]


def test_conf_dir_and_missing_hostfile(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING):
        assert deepy.main([*NEOX, "--config-dir", str(tmp_path / "launch")]) == 0
    out = capsys.readouterr().out
    assert shlex.split(out.splitlines()[0])[:3] == ["deepspeed", "--num_gpus", "1"]
    assert "hostfile /mock_path not found: proceeding with local resources only" in caplog.text
    assert "'<config-file>'" in out and "(not by --dry-run)" in out
    assert not (tmp_path / "launch").exists()  # --dry-run writes nothing
    # Without -d the same names are not found, and the message says which file.
    assert deepy.main(NEOX[:1] + NEOX[3:]) == 2
    assert "config file not found: neox_pythia.yml" in capsys.readouterr().err


def test_dry_run_notices_a_missing_pdsh(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=1\nworker-1 slots=1\n")
    monkeypatch.setattr(deepy.shutil, "which", lambda name: None)  # a host without pdsh
    sets = ["--set", f"hostfile={hostfile}", "--set", "master_addr=worker-0"]
    with caplog.at_level(logging.WARNING):
        assert deepy.main([*NEOX, *sets]) == 0
    assert "--launcher pdsh" in capsys.readouterr().out
    assert "a real launch from this host would fail: pdsh not found on PATH" in caplog.text


@pytest.mark.parametrize(
    "files",
    [["neox_pythia.yml", "neox_setup.yml"], ["neox_llama.yml"], ["sepllm_n64.yml"]],
)
def test_every_compat_config_passes_dry_run(
    files: list[str], capsys: pytest.CaptureFixture
) -> None:
    data = [] if files != ["sepllm_n64.yml"] else ["--set", "data_path=compat_data/x"]
    assert deepy.main(["train.py", "-d", str(HERE), *files, *data, "--dry-run"]) == 0
    assert "train.py --config-file '<config-file>'" in capsys.readouterr().out


def test_eval_takes_neox_conf_dir(tmp_path: Path) -> None:
    """`python deepy.py eval.py -d configs model.yml --eval_tasks ...` (NeoX's README form):
    deepy.py hands eval.py its arguments, and eval.py reads the names under -d."""
    import importlib.util

    from tests.inference.fixtures import write_checkpoint

    spec = importlib.util.spec_from_file_location("eval_cli", HERE.parents[1] / "eval.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    ckpt = write_checkpoint(tmp_path / "ours")
    (tmp_path / "model.yml").write_text(f"load: {ckpt}\n")
    argv = ["-d", str(tmp_path), "model.yml", "--eval_tasks", "shakespeare_lambada"]
    assert str(ckpt) in str(vars(eval_cli.settings(argv)))
