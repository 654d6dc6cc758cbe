"""Issue 22 (WEAK, data tools): preprocess_data.py fails when most lines are bad (1 good line
and 1000 bad ones exited 0), refuses a second run into a prefix another run is writing (both
exited 0, the last rename winning), and inspect_data.py on a missing prefix says so without a
traceback. In-process calls of the tools' main() with the character tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron.data.indexed_dataset import MMapIndexedDataset
from tests.conftest import ROOT
from tools.datasets import inspect_data, preprocess_data

GOOD = json.dumps({"text": "hello"}).encode() + b"\n"


def run(tmp_path: Path, data: bytes, *flags: str) -> int:
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--workers", "0"]
    args += ["--no-progress", "--tokenizer-type", "CharLevelTokenizer", *flags]
    return preprocess_data.main(args)


def test_mostly_bad_lines_fail_and_write_nothing(tmp_path: Path, capsys) -> None:
    data = GOOD + b"{broken\n" * 1000
    assert run(tmp_path, data) == 1
    err = capsys.readouterr().err
    assert "1,000 of 1,001 lines are not documents (invalid_json=1000" in err
    assert f"{tmp_path / 'in.jsonl'}:2: invalid_json" in err and "--max-bad-fraction" in err
    assert not list(tmp_path.glob("out*"))
    # A few stray lines, and blank lines (paragraph breaks), pass with the count reported.
    assert run(tmp_path, GOOD * 200 + b"{broken\n" + b"\n" * 50) == 0
    assert "invalid_json=1" in capsys.readouterr().out
    assert run(tmp_path, data, "--max-bad-fraction", "1") == 0  # the explicit way out
    assert len(MMapIndexedDataset(str(tmp_path / "out_text_document"))) == 1


def test_second_run_into_a_prefix_being_written_is_refused(tmp_path: Path, capsys) -> None:
    lock = tmp_path / ".out.preprocess.lock"
    code = (
        "import time; from megatron.common.files import file_lock\n"
        f"with file_lock({str(lock)!r}, 5):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        assert run(tmp_path, GOOD) == 1
        err = capsys.readouterr().err
        assert f"another preprocessing run is writing {tmp_path / 'out'}" in err
        assert f"pid {holder.pid} on " in err
    finally:
        holder.kill()
        holder.wait()
    assert run(tmp_path, GOOD) == 0


def test_inspect_missing_prefix_is_a_message(tmp_path: Path, capsys) -> None:
    assert inspect_data.main([str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert f"inspect_data.py: error: {tmp_path / 'nothing'}.idx: missing" in err
    assert "Traceback" not in err
