"""The SepLLM overlay's separator ids are the ones the tool derives for the bundled tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron.data.bundled import ensure_shakespeare
from megatron.data.tokenizers import tokenizer_for_file
from megatron.sepllm.separators import separator_ids

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yml").read_text())
    assert tiny["prepare_data"] == "shakespeare"
    return ensure_shakespeare(str(tmp_path_factory.mktemp("corpus")), vocab_size=8192)[1]


def test_tiny_sepllm_separator_ids_match_tool(tiny_tokenizer: str) -> None:
    overlay = yaml.safe_load((ROOT / "configs" / "tiny_sepllm.yml").read_text())["sepllm"]
    derived = separator_ids(tokenizer_for_file(tiny_tokenizer))
    assert overlay["separator_token_ids"] == derived
