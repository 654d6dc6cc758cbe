"""Every tokenizer type we train with becomes files AutoTokenizer loads with our ids, or is
refused with a message (the exporter checks the ids itself; these tests check independently
on other text)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_tokenizer import TokenizerRefused, write_tokenizer
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer

from megatron.config.schema import DataConfig
from megatron.data.tokenizers import build_tokenizer, default_tiktoken_file

TEXT = "O Romeo, Romeo! wherefore art thou Romeo?\n\tDeny thy father; and refuse thy name.  "


def _same_ids(data: DataConfig, out: Path) -> None:
    ids = write_tokenizer(data, out)
    ours = build_tokenizer(data)
    theirs = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert theirs(TEXT, add_special_tokens=False)["input_ids"] == ours.tokenize(TEXT)
    assert ids["eos_token_id"] == ours.eod == theirs.eos_token_id


def test_hf_tokenizer_json(shakespeare: tuple[str, str], tmp_path: Path) -> None:
    _same_ids(DataConfig(tokenizer_type="HFTokenizer", vocab_file=shakespeare[1]), tmp_path)


def test_gpt2_bpe_vocab_and_merges(shakespeare: tuple[str, str], tmp_path: Path) -> None:
    vocab, merges = RawTokenizer.from_file(shakespeare[1]).model.save(str(tmp_path))
    (tmp_path / "out").mkdir()
    data = DataConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    _same_ids(data, tmp_path / "out")


@pytest.mark.skipif(default_tiktoken_file() is None, reason="no .tiktoken file installed")
def test_tiktoken(tmp_path: Path) -> None:
    data = DataConfig(tokenizer_type="TiktokenTokenizer", vocab_file=default_tiktoken_file())
    _same_ids(data, tmp_path)


def test_sentencepiece_that_transformers_splits_differently_is_refused(tmp_path: Path) -> None:
    """transformers' SentencePiece route (LlamaTokenizer) does not reproduce this unigram
    model's ids; the exporter must say so rather than write it."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT + "\n") * 50 + "Romeo and Juliet, a tragedy in five acts.\n" * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
        eos_piece="</s>", bos_id=-1, unk_id=0, eos_id=1, pad_id=2, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "out").mkdir()
    data = DataConfig(tokenizer_type="SPMTokenizer", vocab_file=str(tmp_path / "sp.model"))
    try:
        _same_ids(data, tmp_path / "out")  # exported: then the ids must match (checked)
    except TokenizerRefused as e:
        assert "SPMTokenizer" in str(e)
