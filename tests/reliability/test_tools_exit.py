"""Reliability case 15: the dataset tools exit non-zero when they failed.

preprocess_data.py that produced 0 documents (empty file, missing text key, binary input)
and inspect_data.py --scan that found token ids outside the vocabulary. In-process calls of
the tools' main() with the character tokenizer (no tokenizer files needed): fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDatasetBuilder
from tools.datasets import inspect_data, preprocess_data


def preprocess(tmp_path: Path, name: str, data: bytes, *flags: str) -> int:
    src = tmp_path / name
    src.write_bytes(data)
    prefix = str(tmp_path / "out")
    args = ["--input", str(src), "--output-prefix", prefix, "--workers", "0", "--no-progress"]
    return preprocess_data.main([*args, "--tokenizer-type", "CharLevelTokenizer", *flags])


@pytest.mark.parametrize(
    ("name", "data", "flags", "reason"),
    [
        ("empty.jsonl", b"", (), "no lines read"),
        ("docs.jsonl", json.dumps({"content": "hello"}).encode() + b"\n", (), "missing"),
        ("blob.jsonl", bytes(range(128, 256)) * 40, (), "skipped"),
        ("docs.jsonl", json.dumps({"text": "hello"}).encode(), ("--jsonl-keys", "body"), "body"),
    ],
)
def test_preprocess_without_documents_fails(
    tmp_path: Path, capsys, name: str, data: bytes, flags: tuple, reason: str
) -> None:
    assert preprocess(tmp_path, name, data, *flags) == 1
    err = capsys.readouterr().err
    assert "produced no documents, nothing written" in err and reason in err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]  # no empty dataset


def test_preprocess_with_documents_succeeds(tmp_path: Path, capsys) -> None:
    data = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in ("hello", "world"))
    assert preprocess(tmp_path, "docs.jsonl", data) == 0
    assert "2 documents" in capsys.readouterr().out


def test_inspect_scan_error_exits_nonzero(tmp_path: Path, capsys) -> None:
    prefix = str(tmp_path / "ds")
    b = IndexedDatasetBuilder(prefix, np.int32)
    b.add_documents(np.array([1, 2, 70000], dtype=np.int32), np.array([3], dtype=np.int32))
    b.finalize()
    args = [prefix, "--tokenizer-type", "CharLevelTokenizer", "--scan"]
    assert inspect_data.main(args) == 1
    captured = capsys.readouterr()
    assert "ERROR: exceeds the tokenizer vocabulary" in captured.out
    assert "max token id 70000" in captured.err.strip().splitlines()[-1]
