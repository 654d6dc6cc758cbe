"""Bad preprocessing input is skipped and counted (or named with file:line under --strict)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron.data.indexed_dataset import DataError, MMapIndexedDataset
from megatron.data.preprocess import preprocess


@pytest.fixture()
def messy(tmp_path):
    p = tmp_path / "messy.jsonl"
    with open(p, "wb") as f:
        f.write(json.dumps({"text": "good one"}).encode() + b"\n")  # line 1
        f.write(b"{not json\n")  # 2
        f.write(b'{"text": "bad \xff\xfe bytes"}\n')  # 3
        f.write(b'{"text": ""}\n')  # 4
        f.write(b'{"other": "x"}\n')  # 5
        f.write(b"\n")  # 6
        f.write(b'{"text": 3}\n')  # 7
        f.write(json.dumps({"text": "good two"}).encode() + b"\n")  # 8
    return str(p)


def test_skipped_and_counted(messy, tmp_path, tokenizer_files) -> None:
    vocab = tokenizer_files["HFTokenizer"][0]
    for workers in (0, 1):
        s = preprocess(
            [messy],
            str(tmp_path / f"o{workers}"),
            "HFTokenizer",
            vocab,
            append_eod=True,
            workers=workers,
            progress=False,
            max_bad_fraction=1.0,  # 4 of 8 lines bad: kept here to check the counts
        )["text"]
        assert s.docs == 2
        assert dict(s.skipped) == {"invalid_json": 1, "non_utf8": 1, "empty": 2, "missing_key": 2}
        assert any(m.endswith("messy.jsonl:2: invalid_json (key 'text')") for m in s.examples)
        assert any("messy.jsonl:3: non_utf8" in m for m in s.examples)
        assert "skipped: empty=2, invalid_json=1, missing_key=2, non_utf8=1" in s.summary()
        assert len(MMapIndexedDataset(s.output_prefix)) == 2


def test_strict_names_file_and_line(messy, tmp_path, tokenizer_files) -> None:
    vocab = tokenizer_files["HFTokenizer"][0]
    with pytest.raises(DataError, match=r"messy\.jsonl:2: invalid_json"):
        preprocess(
            [messy],
            str(tmp_path / "o"),
            "HFTokenizer",
            vocab,
            workers=0,
            strict=True,
            progress=False,
        )
    # nothing half-written is left behind under the final names
    assert not (tmp_path / "o_text_document.bin").exists()
    assert not list(tmp_path.glob("o_text_document.bin.tmp*"))


def test_missing_inputs_fail_before_work(tmp_path, tokenizer_files) -> None:
    vocab = tokenizer_files["HFTokenizer"][0]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess([str(tmp_path / "nope.jsonl")], str(tmp_path / "o"), "HFTokenizer", vocab)
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="missing.json"):
        preprocess([str(good)], str(tmp_path / "o"), "HFTokenizer", str(tmp_path / "missing.json"))


def test_cli_end_to_end(tmp_path, corpus_dir, tokenizer_files) -> None:
    vocab = tokenizer_files["HFTokenizer"][0]
    out = subprocess.run(
        [
            sys.executable,
            "tools/datasets/preprocess_data.py",
            "--input",
            f"{corpus_dir}/docs.jsonl",
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-type",
            "HFTokenizer",
            "--vocab-file",
            vocab,
            "--append-eod",
            "--workers",
            "2",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "13 documents" in out.stdout
    insp = subprocess.run(
        [
            sys.executable,
            "tools/datasets/inspect_data.py",
            str(tmp_path / "cli_text_document"),
            "--tokenizer-type",
            "HFTokenizer",
            "--vocab-file",
            vocab,
            "--doc",
            "12",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "documents: 13" in insp.stdout and "café" in insp.stdout
