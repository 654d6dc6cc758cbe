"""Reliability case 6: SIGTERM / SIGINT stop the run: deepy.py forwards the signal, the ranks
stop between steps (never mid-save) and every process exits non-zero within a bound.

Real short runs (tiny model, many iterations) signalled once training is under way.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from megatron.checkpoint.layout import COMPLETE as COMPLETE_NAME
from tests.conftest import ROOT, write_config

BOUND_S = 60  # DeepSpeed's launcher SIGKILLs ranks 30 s after its SIGTERM; ours stop sooner


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_training(proc: subprocess.Popen, lines: list[str], iteration: int = 3) -> None:
    """Read output until rank 0 logs `iteration` (the loop is running, checkpoints exist)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if f"iter {iteration:>6}/" in line or f"iter {iteration}/" in line:
            return
    raise AssertionError("run ended before training started:\n" + "".join(lines[-60:]))


def finish(proc: subprocess.Popen, lines: list[str]) -> tuple[int, str, float]:
    start_s = time.monotonic()
    out, _ = proc.communicate(timeout=BOUND_S + 30)
    lines.append(out)
    return proc.returncode, "".join(lines), time.monotonic() - start_s


def long_run(tmp_path: Path, shakespeare, checkpoint_factor: int = 2) -> tuple[Path, Path]:
    save = tmp_path / "ck"
    cfg = write_config(
        tmp_path,
        shakespeare,
        train_iters=100000,
        checkpoint_factor=checkpoint_factor,
        eval_interval=0,
        save=str(save),
        keep_last_n_checkpoints=2,
    )
    return cfg, save


def start_deepy_run(
    tmp_path: Path, shakespeare
) -> tuple[subprocess.Popen, list[str], list[psutil.Process], Path]:
    """A long run under deepy.py, read until it trains: (deepy.py, its output so far, the
    processes it started, a rank among them, the save directory)."""
    cfg, save = long_run(tmp_path, shakespeare)
    proc, lines = start(["deepy.py", "train.py", str(cfg), "--num-gpus", "1"]), []
    wait_for_training(proc, lines)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("train.py" in " ".join(p.cmdline()) for p in tree), "no rank process found"
    return proc, lines, tree, save


def test_sigterm_to_deepy_stops_every_rank(tmp_path: Path, shakespeare) -> None:
    proc, lines, tree, save = start_deepy_run(tmp_path, shakespeare)
    proc.send_signal(signal.SIGTERM)
    code, out, took = finish(proc, lines)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert took < BOUND_S, f"took {took:.0f}s"
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    assert "passing it to the ranks" in out and "stopping after this step" in out
    tag = (save / "latest").read_text().strip()
    assert (save / tag / COMPLETE_NAME).is_file()  # latest names a complete checkpoint


def test_sigint_to_a_rank_stops_between_steps(tmp_path: Path, shakespeare) -> None:
    """No periodic checkpoint is due: the one on disk is the stop's, of the last finished
    step, and a resumed run continues from it."""
    cfg, save = long_run(tmp_path, shakespeare, checkpoint_factor=100000)
    proc, lines = start(["train.py", str(cfg)]), []
    wait_for_training(proc, lines)
    proc.send_signal(signal.SIGINT)
    code, out, took = finish(proc, lines)
    assert code == 128 + signal.SIGINT, out[-3000:]
    assert took < BOUND_S
    assert "SIGINT received: stopping after this step" in out
    assert "rank stopped by SIGINT" in out.strip().splitlines()[-1]
    stopped = int(re.search(r"saving a checkpoint of iteration (\d+) before stopping", out)[1])
    assert stopped >= 3
    tag = (save / "latest").read_text().strip()
    assert tag == f"global_step{stopped}" and (save / tag / COMPLETE_NAME).is_file()
    resumed = subprocess.run(
        [sys.executable, "train.py", str(cfg), "--set", f"train_iters={stopped + 1}",
         "--set", f"load={save}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at iteration {stopped}," in resumed.stdout + resumed.stderr
