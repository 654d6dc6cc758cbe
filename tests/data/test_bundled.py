"""The bundled Shakespeare corpus: contents, statistics, idempotence and concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np

from megatron.data.bundled import ensure_shakespeare, shakespeare_files
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.tokenizers import HFTokenizer


def _call(root: str) -> tuple[str, str]:
    return ensure_shakespeare(root, vocab_size=1024)


def test_bundled_corpus(tmp_path) -> None:
    root = str(tmp_path / "shk")
    with mp.get_context("spawn").Pool(2) as pool:  # two concurrent builders
        results = pool.map(_call, [root, root])
    assert results[0] == results[1]
    prefix, tok_path = results[0]
    mtime = os.path.getmtime(prefix + ".bin")
    assert ensure_shakespeare(root, vocab_size=1024) == (prefix, tok_path)
    assert os.path.getmtime(prefix + ".bin") == mtime  # idempotent: not rebuilt

    stats = json.load(open(os.path.join(root, "stats.json")))
    ds = MMapIndexedDataset(prefix)
    tok = HFTokenizer(tok_path)
    files = shakespeare_files()
    assert stats["num_docs"] == len(ds) == len(files) >= 36
    assert stats["num_tokens"] == ds.num_tokens
    assert tok.vocab_size == 1024
    # every document ends with EOD and decodes back to its play
    for i in (0, len(ds) - 1):
        assert ds[i][-1] == tok.eod
        text = tok.detokenize(ds[i][:-1])
        assert text.strip() == open(files[i], encoding="utf-8").read().strip()
    # unigram entropy recomputed independently from the token stream
    _, counts = np.unique(np.concatenate([ds[i] for i in range(len(ds))]), return_counts=True)
    p = counts / counts.sum()
    assert abs(stats["unigram_entropy_nats"] - float(-(p * np.log(p)).sum())) < 1e-9
    assert not [n for n in os.listdir(root) if ".tmp" in n]
