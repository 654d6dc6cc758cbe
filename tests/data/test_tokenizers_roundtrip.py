"""text -> .bin/.idx -> decoded text, for every tokenizer type."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron.config.schema import DataConfig
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess import preprocess
from megatron.data.tokenizers import (
    TOKENIZER_TYPES,
    build_tokenizer,
    default_tiktoken_file,
    infer_tokenizer_type,
    tokenizer_for_file,
)
from megatron.sepllm.separators import separator_ids, separator_tokens


@pytest.mark.parametrize("tok_type", TOKENIZER_TYPES)
def test_roundtrip(tok_type, tokenizer_files, corpus_dir, small_texts, tmp_path) -> None:
    if tok_type == "TiktokenTokenizer" and default_tiktoken_file() is None:
        pytest.skip("no gpt2.tiktoken available")
    vocab, merges = tokenizer_files[tok_type]
    tok = build_tokenizer(DataConfig(tokenizer_type=tok_type, vocab_file=vocab, merge_file=merges))
    assert 0 <= tok.eod < tok.vocab_size and 0 <= tok.pad < tok.vocab_size
    stats = preprocess(
        [os.path.join(corpus_dir, "docs.jsonl")],
        str(tmp_path / "out"),
        tok_type,
        vocab,
        merges,
        append_eod=True,
        workers=0,
        progress=False,
    )["text"]
    ds = MMapIndexedDataset(stats.output_prefix)
    assert len(ds) == len(small_texts) == stats.docs
    assert ds.dtype == (np.uint16 if tok.vocab_size < 65500 else np.int32)
    for i, text in enumerate(small_texts):
        ids = ds[i]
        assert ids[-1] == tok.eod
        assert ids.max() < tok.vocab_size
        assert tok.detokenize(ids[:-1].tolist()) == text


def test_gpt2_files_match_hf_tokenizer(tokenizer_files, small_texts) -> None:
    """vocab.json + merges.txt exported from a tokenizer.json must tokenize identically."""
    hf = build_tokenizer(DataConfig(vocab_file=tokenizer_files["HFTokenizer"][0]))
    v, m = tokenizer_files["GPT2BPETokenizer"]
    gpt2 = build_tokenizer(
        DataConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=v, merge_file=m)
    )
    assert hf.eod == gpt2.eod
    for t in small_texts:
        assert hf.tokenize(t) == gpt2.tokenize(t)


def test_multiprocess_output_identical(tokenizer_files, corpus_dir, tmp_path) -> None:
    vocab = tokenizer_files["HFTokenizer"][0]
    src = [os.path.join(corpus_dir, "docs.jsonl")]
    outs = []
    for w in (0, 2):
        s = preprocess(
            src,
            str(tmp_path / f"w{w}"),
            "HFTokenizer",
            vocab,
            workers=w,
            batch_lines=3,
            progress=False,
        )["text"]
        outs.append(s.output_prefix)
    for suffix in (".bin", ".idx"):
        with open(outs[0] + suffix, "rb") as a, open(outs[1] + suffix, "rb") as b:
            assert a.read() == b.read()


def test_txt_doc_per_file_and_gzip(tokenizer_files, corpus_dir, small_texts, tmp_path) -> None:
    import gzip

    vocab = tokenizer_files["HFTokenizer"][0]
    tok = build_tokenizer(DataConfig(vocab_file=vocab))
    txts = [os.path.join(corpus_dir, f"doc{i}.txt") for i in range(3)]
    s = preprocess(
        txts,
        str(tmp_path / "t"),
        "HFTokenizer",
        vocab,
        workers=0,
        txt_doc_per_file=True,
        progress=False,
    )["text"]
    ds = MMapIndexedDataset(s.output_prefix)
    assert [tok.detokenize(ds[i]) for i in range(3)] == small_texts[:3]
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        for t in small_texts[:4]:
            f.write(json.dumps({"text": t}) + "\n")
    s = preprocess([str(gz)], str(tmp_path / "g"), "HFTokenizer", vocab, workers=0, progress=False)[
        "text"
    ]
    ds = MMapIndexedDataset(s.output_prefix)
    assert [tok.detokenize(ds[i]) for i in range(4)] == small_texts[:4]


def test_missing_tokenizer_files_are_named(tmp_path) -> None:
    for t in ("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer"):
        with pytest.raises(FileNotFoundError, match="nope"):
            build_tokenizer(DataConfig(tokenizer_type=t, vocab_file=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="unknown tokenizer_type"):
        build_tokenizer(DataConfig(tokenizer_type="Bogus"))


@pytest.mark.parametrize("tok_type", TOKENIZER_TYPES)
def test_separators_come_from_the_data_tokenizer(tok_type, tokenizer_files) -> None:
    """The object that tokenizes the data is the one separator ids are derived from, for
    every tokenizer type; and each separator id decodes back to its string."""
    if tok_type == "TiktokenTokenizer" and default_tiktoken_file() is None:
        pytest.skip("no gpt2.tiktoken available")
    vocab, merges = tokenizer_files[tok_type]
    tok = build_tokenizer(DataConfig(tokenizer_type=tok_type, vocab_file=vocab, merge_file=merges))
    found = separator_tokens(tok)
    assert found and len({t.id for t in found}) == len(found)
    for t in found:
        assert 0 <= t.id < tok.vocab_size and t.text == tok.detokenize([t.id])
        if t.text in (".", ","):  # the id the data holds for this string
            # (SentencePiece encodes "." as "▁" + "."; the vocabulary lookup finds ".".)
            assert t.id == tok.tokenize(t.text)[-1]
    if vocab and tok_type != "CharLevelTokenizer":
        assert infer_tokenizer_type(vocab, merges) == tok_type
        assert separator_ids(tokenizer_for_file(vocab, merges)) == [t.id for t in found]


def test_token_to_id(tokenizer_files) -> None:
    hf = build_tokenizer(
        DataConfig(tokenizer_type="HFTokenizer", vocab_file=tokenizer_files["HFTokenizer"][0])
    )
    assert hf.token_to_id("<|endoftext|>") == hf.eod and hf.token_to_id("no such token") is None
    spm_file = tokenizer_files["SPMTokenizer"][0]
    spm = build_tokenizer(DataConfig(tokenizer_type="SPMTokenizer", vocab_file=spm_file))
    assert spm.token_to_id(".") == spm.tokenize(".")[-1]
    assert spm.token_to_id("\u2603\u2603 not a piece") is None
    if default_tiktoken_file() is not None:
        gpt2 = tokenizer_for_file()  # gpt2.tiktoken
        assert gpt2.token_to_id(" .") == 764 and gpt2.token_to_id(" . . .x") is None
