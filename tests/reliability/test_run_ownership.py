"""Issue 22, BAD 1 and 3: one trainer per save directory, no trainer outlives deepy.py, and a
fresh start is never silent.

- `kill -9` of deepy.py: the ranks (which watch it) stop between steps, and DeepSpeed's
  launcher ends with them; nothing of the process tree keeps training.
- A second run into a save directory that a running trainer holds is refused, naming it.
- A `load` path that does not exist is refused (a typo), unlike an empty one; a run that
  starts from iteration 0 logs so, naming the path it looked in.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron.config.loader import build_config, merge_sources
from megatron.config.validate import finalize
from megatron.training import preflight
from megatron.training.checkpoint import COMPLETE
from tests.conftest import ROOT
from tests.reliability.test_signals import start_deepy_run

BASE = {"train_micro_batch_size_per_gpu": 2, "data_path": "data/x"}


def cfg(**kw):
    return finalize(build_config(merge_sources([("test", {**BASE, **kw})])), 1, 1024)


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the run lock, as a running trainer's rank 0 does."""
    code = (
        "import sys, time; from megatron.common.files import file_lock\n"
        f"with file_lock({str(path)!r}, 5):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_second_trainer_into_a_held_save_dir_is_refused(tmp_path: Path) -> None:
    save = tmp_path / "ck"
    save.mkdir()
    holder = hold_lock(save / preflight.RUN_LOCK)
    try:
        with pytest.raises(preflight.PreflightError) as exc:
            with preflight.save_dir_lock(cfg(save=str(save)), rank=0):
                raise AssertionError("entered a directory another trainer holds")
        assert f"save = {save} is in use by another training run" in str(exc.value)
        assert f"pid {holder.pid} on " in str(exc.value)  # names the holder
    finally:
        holder.kill()
        holder.wait()
    with preflight.save_dir_lock(cfg(save=str(save)), rank=0):  # free once it exits
        pass


def test_missing_load_path_differs_from_an_empty_one(tmp_path: Path) -> None:
    typo = tmp_path / "chekpoints"
    (err,) = preflight.load_errors(cfg(load=str(typo), save=str(tmp_path / "ck")))
    assert f"load = {typo} does not exist" in err and "ENOENT" in err
    (err,) = preflight.load_errors(cfg(load=str(typo), allow_fresh_start=True))
    assert "does not exist" in err  # allow_fresh_start does not cover a typo
    # The first run of a job resuming from its own save directory creates it.
    own = {"load": str(typo), "save": str(typo), "allow_fresh_start": True}
    assert preflight.load_errors(cfg(**own)) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert preflight.load_errors(cfg(load=str(empty), allow_fresh_start=True)) == []


def test_fresh_start_names_the_path_it_looked_in(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    note = preflight.fresh_start_note(cfg(load=str(empty), allow_fresh_start=True))
    assert note and "FRESH START" in note and f"load = {empty}" in note
    assert "holds no checkpoint" in note
    (empty / "global_step3").mkdir()  # a save that never completed: no `latest`
    note = preflight.fresh_start_note(cfg(load=str(empty), allow_fresh_start=True))
    assert note and "global_step3 but no `latest` file" in note
    assert "fresh start" in (preflight.fresh_start_note(cfg()) or "")
    (empty / "global_step3" / COMPLETE).write_text("3")
    (empty / "latest").write_text("global_step3")
    assert preflight.fresh_start_note(cfg(load=str(empty), allow_fresh_start=True)) is None


RANK = (
    "import os, sys, time; from megatron.common.watchdog import watch_launcher\n"
    "watch_launcher(sys.argv[1], interval_s=0.1)\n"
    "print('watching', os.getpid(), flush=True); time.sleep(60)\n"
)


def start_rank(spec: str, via_middle: bool) -> tuple[subprocess.Popen, psutil.Process]:
    """A process running the rank's watch, started directly or by a middle process that
    stands for DeepSpeed's per-node launcher."""
    rank = [sys.executable, "-c", RANK, spec]
    if via_middle:
        rank = [sys.executable, "-c", f"import subprocess; subprocess.Popen({rank!r}).wait()"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(rank, cwd=ROOT, text=True, **pipes)
    assert proc.stdout is not None
    return proc, psutil.Process(int(proc.stdout.readline().split()[1]))


@pytest.mark.parametrize("killed", ["deepy.py", "the per-node launcher"])
def test_a_rank_stops_when_its_launcher_is_killed(killed: str) -> None:
    """The watch alone, in light processes: SIGTERM (the rank's ordinary stop) within a
    second of the kill; the full tree under deepy.py is the slow test below."""
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    spec = f"{socket.gethostname()} {stand_in.pid}" if killed == "deepy.py" else "elsewhere 1"
    middle, rank = start_rank(spec, via_middle=killed != "deepy.py")
    try:
        victim = stand_in if killed == "deepy.py" else middle
        victim.kill()
        victim.wait()
        code = rank.wait(timeout=10)  # gone; its code is known only to its parent
        assert code in (None, -signal.SIGTERM)
        assert middle.stderr is not None
        said = middle.stderr.read()
        gone = f"pid {stand_in.pid}" if killed == "deepy.py" else f"pid {middle.pid}"
        assert f"{gone}) is gone (killed?): stopping this rank" in said, said
    finally:
        for p in (stand_in, middle):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_kill_9_of_deepy_stops_the_launcher_and_the_ranks(tmp_path: Path, shakespeare) -> None:
    proc, lines, tree, save = start_deepy_run(tmp_path, shakespeare)
    assert (save / preflight.RUN_LOCK).read_text().startswith("pid ")  # rank 0 holds it
    proc.kill()
    proc.wait()  # reaped, as a shell would
    t0 = time.monotonic()
    _, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"still running after kill -9 of deepy.py: {[p.cmdline() for p in alive]}"
    assert time.monotonic() - t0 < 60
    out = "".join(lines) + (proc.stdout.read() if proc.stdout else "")
    assert "fresh start: `load` is not set" in out  # said by the real run, not only the helper
    tag = (save / "latest").read_text().strip()
    assert (save / tag / COMPLETE).is_file(), out[-3000:]  # latest names a complete one
    assert (save / preflight.RUN_LOCK).read_text() == ""  # released: a restart may run
