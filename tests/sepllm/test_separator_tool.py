"""tools/sepllm/separator_ids.py builds the tokenizer through megatron.data, from a file or
from a config's data section, and checks the config's separator ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from megatron.data.tokenizer_training import train_bpe
from megatron.data.tokenizers import tokenizer_for_file
from megatron.sepllm.separators import separator_ids

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    path = ROOT / "tools" / "sepllm" / "separator_ids.py"
    spec = importlib.util.spec_from_file_location("separator_ids_tool", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("tok")
    text = d / "t.txt"
    text.write_text("To be, or not to be: that is the question!\nWhy?  Yes; no.\t\n" * 50)
    return train_bpe([str(text)], str(d / "tokenizer.json"), vocab_size=300)


def _ids_printed(out: str) -> list[int]:
    line = [ln for ln in out.splitlines() if ln.startswith("separator_token_ids:")][0]
    return yaml.safe_load(line.split(":", 1)[1])


def test_tool_on_a_file(tok_json: str, capsys: pytest.CaptureFixture) -> None:
    assert _tool().main([tok_json]) == 0
    out = capsys.readouterr().out
    assert "HFTokenizer" in out
    assert _ids_printed(out) == separator_ids(tokenizer_for_file(tok_json))


def test_tool_on_a_config_checks_its_ids(
    tok_json: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    expected = separator_ids(tokenizer_for_file(tok_json))
    cfg = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "seq_length": 32,
        "train_micro_batch_size_per_gpu": 2,
        "train_iters": 2,
        "data_path": "data/x",
        "tokenizer_type": "HFTokenizer",
        "vocab_file": tok_json,
        "sepllm": {"mode": "sepllm", "separator_token_ids": expected},
    }
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    tool = _tool()
    assert tool.main(["--config", str(path)]) == 0
    assert _ids_printed(capsys.readouterr().out) == expected
    # A stale list in the config (e.g. after retraining the tokenizer) is reported.
    assert tool.main(["--config", str(path), "--set", "separator_token_ids=[1, 2]"]) == 1
    assert "differ" in capsys.readouterr().err
