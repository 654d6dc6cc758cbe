"""Issue 22 (WEAK, data files): a corpus whose .idx names another dtype (negative or float
token ids) and a tampered index cache fail with the file named, not as an IndexError or a
numpy pickle error mid-run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from megatron.data import builder
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import (
    HEADER_SIZE,
    DataError,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
)

DTYPE_CODE_OFFSET = HEADER_SIZE - 17  # the <B dtype code, before the two <Q counts


def corpus(prefix: Path, top: int) -> str:
    b = IndexedDatasetBuilder(str(prefix), np.uint16)
    for j in range(8):
        b.add_document(np.arange(40) + top - 40 * (j + 1))
    b.finalize()
    return str(prefix)


def relabel(prefix: str, code: int) -> None:
    with open(f"{prefix}.idx", "r+b") as f:
        f.seek(DTYPE_CODE_OFFSET)
        f.write(bytes([code]))


def test_relabelled_dtype_gives_negative_or_float_ids_named(tmp_path: Path) -> None:
    builder._OPEN.clear()
    prefix = corpus(tmp_path / "c", top=60000)  # uint16 ids above 32767
    relabel(prefix, 3)  # int16: the same bytes read as negative ids
    with pytest.raises(DataError, match=rf"{prefix}.bin: contains negative token id -\d+"):
        builder.open_indexed(prefix, vocab_size=65536)
    # Corpora too large for the up-front scan are checked sample by sample.
    ds = GPTDataset("train", MMapIndexedDataset(prefix), np.arange(8), 4, 16, 1, str(tmp_path))
    with pytest.raises(DataError, match=rf"{prefix}.bin: negative token id"):
        [ds[i] for i in range(len(ds))]
    relabel(prefix, 7)  # float32
    with pytest.raises(DataError, match=rf"{prefix}.idx: dtype float32 cannot hold token ids"):
        MMapIndexedDataset(prefix)


@pytest.mark.parametrize("tamper", ["pickled objects", "out of range", "truncated"])
def test_tampered_index_cache_is_named_and_rebuilt(tmp_path: Path, caplog, tamper: str) -> None:
    prefix = corpus(tmp_path / "c", top=1000)
    cache = tmp_path / "cache"

    def build() -> GPTDataset:
        return GPTDataset("train", MMapIndexedDataset(prefix), np.arange(8), 30, 16, 1, str(cache))

    good = build()
    reference = [good[i]["text"] for i in range(len(good))]
    (doc_file,) = cache.glob("*_doc_idx.npy")
    if tamper == "pickled objects":
        np.save(doc_file, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif tamper == "out of range":
        np.save(doc_file, np.full(len(good.doc_idx), 99, dtype=np.int64))
    else:
        doc_file.write_bytes(doc_file.read_bytes()[:70])
    with caplog.at_level(logging.WARNING):
        again = build()
    assert f"index cache {doc_file}" in caplog.text and "rebuilding it" in caplog.text
    assert [again[i]["text"].tolist() for i in range(len(again))] == [r.tolist() for r in reference]
