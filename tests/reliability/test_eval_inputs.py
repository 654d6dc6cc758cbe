"""Issue 22, BAD 4 and 5 and the streaming-perplexity inputs: evaluate_ppl.py refuses what it
cannot score honestly, before the work, naming the file.

- binary or non-UTF-8 (latin-1) text: refused naming the file and the first bad byte (it used
  to be scored as replacement characters, rc 0); a malformed .jsonl line names file and line;
- an output_dir holding an earlier run's results: refused unless --overwrite, checked before
  the model loads; an earlier ppl.png never stays beside new numbers;
- an empty or 1-token text: an error, not ppl NaN with rc 0; --num_eval_tokens beyond the
  text: a warning with both counts.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from megatron.inference import perplexity, texts
from tests.inference.fixtures import TEXT, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "evaluate_ppl", ROOT / "tools/streaming/evaluate_ppl.py"
)
evaluate_ppl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_ppl)


def test_binary_and_latin1_text_is_refused_naming_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"{binary}: binary data, not text \(a NUL byte"):
        list(texts.iter_texts(str(binary)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nna\u00efve caf\u00e9\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=rf"{latin}: not UTF-8 text \(byte 0xef at offset 13, line 2\)"
    ):
        list(texts.iter_texts(str(latin)))
    good = tmp_path / "good.txt"
    good.write_text("na\u00efve caf\u00e9\n", encoding="utf-8")
    assert list(texts.iter_texts(str(good))) == ["na\u00efve caf\u00e9\n"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut\n')
    it = texts.iter_texts(str(path))
    assert next(it) == "fine"
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON line"):
        next(it)
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text"):
        list(texts.iter_texts(str(path)))


def test_output_dir_with_results_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    argv = ["--model_name_or_path", str(tmp_path / "no_model"), "--dataset_name", str(text)]
    with pytest.raises(ValueError, match=rf"--output_dir {out} already holds results .*summary"):
        evaluate_ppl.main([*argv, "--output_dir", str(out)])
    # With --overwrite the next check is the model: the output check passed before it.
    with pytest.raises((FileNotFoundError, ValueError), match="no_model"):
        evaluate_ppl.main([*argv, "--output_dir", str(out), "--overwrite"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=rf"--output_dir {blocker}/o: cannot write there"):
        evaluate_ppl.main([*argv, "--output_dir", str(blocker / "o")])


def test_overwrite_replaces_results_and_never_keeps_an_old_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "ppl.png").write_bytes(b"an earlier run's plot")
    perplexity.write_outputs(str(out), perplexity.StreamResult(), {}, torch.device("cpu"))
    assert not (out / "ppl.png").exists()
    assert json.loads((out / "summary.json").read_text())["num_tokens"] == 0


def test_short_text_is_an_error_and_a_short_budget_is_said(tmp_path: Path, capsys) -> None:
    model = write_checkpoint(tmp_path / "m")
    one = tmp_path / "one.txt"
    one.write_text("a")  # one character = one token of the char-level tokenizer
    argv = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=rf"{one}: no token to score"):
        evaluate_ppl.main([*argv, "--dataset_name", str(one)])
    assert not (tmp_path / "o" / "summary.json").exists()
    short = tmp_path / "short.txt"
    short.write_text("To be, or not")  # 13 tokens: 12 scored
    summary = evaluate_ppl.main([*argv, "--dataset_name", str(short), "--num_eval_tokens", "100"])
    assert summary["num_tokens"] == 12
    assert f"--num_eval_tokens 100 but {short} holds only 12 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num_samples", "--chunk_size", "--num_eval_tokens"])
def test_zero_counts_are_refused_by_name(tmp_path: Path, capsys, flag: str) -> None:
    argv = ["--model_name_or_path", str(tmp_path / "no_model"), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        evaluate_ppl.main([*argv, flag, "0"])
    assert exc.value.code == 2 and flag in capsys.readouterr().err
