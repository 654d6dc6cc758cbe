"""Packed samples, determinism, caching, splits, blending and data errors."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.config.schema import DataConfig
from megatron.data import builder
from megatron.data.builder import build_train_valid_test_datasets, split_boundaries
from megatron.data.indexed_dataset import DataError, IndexedDatasetBuilder


def _make(prefix: str, docs: list[np.ndarray]) -> None:
    b = IndexedDatasetBuilder(prefix, np.uint16)
    for d in docs:
        b.add_document(d)
    b.finalize()


@pytest.fixture()
def corpus(tmp_path):
    """Documents of distinct tokens (doc j holds 1000*j + position) so a sample's origin is
    recoverable from its values."""
    builder._OPEN.clear()
    rng = np.random.default_rng(0)
    docs = [1000 * j + np.arange(int(rng.integers(1, 60))) for j in range(40)]
    prefix = str(tmp_path / "c")
    _make(prefix, docs)
    return prefix, docs


def _cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(data_cache_dir=str(tmp_path / "cache"), **kw)


def test_samples_pack_shuffled_documents(corpus, tmp_path) -> None:
    prefix, docs = corpus
    seq = 16
    train, valid, test = build_train_valid_test_datasets(
        _cfg(tmp_path, data_path=prefix, split="1,0,0"), seq, 7, (50, 0, 0)
    )
    assert valid is None and test is None
    stream = np.concatenate([docs[int(d)] for d in train.doc_idx])
    assert len(train) >= 50
    seen = set()
    for i in range(len(train)):
        x = train[i]["text"]
        assert x.dtype == np.int64 and x.shape == (seq + 1,)
        j = int(train.shuffle_idx[i])
        np.testing.assert_array_equal(x, stream[j * seq : j * seq + seq + 1])
        seen.add(j)
    assert seen == set(range(len(train)))  # shuffle is a permutation
    # every epoch visits each document exactly once
    n_epochs = len(train.doc_idx) // len(docs)
    assert np.all(np.bincount(train.doc_idx, minlength=len(docs)) == n_epochs)


def test_deterministic_cached_and_seeded(corpus, tmp_path) -> None:
    prefix, _ = corpus
    cfg = _cfg(tmp_path, data_path=prefix)
    a = build_train_valid_test_datasets(cfg, 8, 1, (300, 20, 0))[0]
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    b = build_train_valid_test_datasets(cfg, 8, 1, (300, 20, 0))[0]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files  # reused, not rebuilt
    c = build_train_valid_test_datasets(_cfg(tmp_path / "o", data_path=prefix), 8, 2, (300, 20, 0))
    for i in (0, 5, 299):
        np.testing.assert_array_equal(a[i]["text"], b[i]["text"])
    assert any(not np.array_equal(a[i]["text"], c[0][i]["text"]) for i in range(20))
    with pytest.raises(IndexError):
        a[len(a)]


def test_split_boundaries_and_disjoint_splits(corpus, tmp_path) -> None:
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_boundaries("8,1,1", 40) == [0, 32, 36, 40]
    assert split_boundaries("1", 7) == [0, 7, 7, 7]
    prefix, _ = corpus
    tr, va, te = build_train_valid_test_datasets(
        _cfg(tmp_path, data_path=prefix, split="8,1,1"), 8, 1, (10, 10, 10)
    )
    assert set(np.unique(tr.doc_idx)) == set(range(32))
    assert set(np.unique(va.doc_idx)) == set(range(32, 36))
    assert set(np.unique(te.doc_idx)) == set(range(36, 40))


def test_blended_proportions(tmp_path) -> None:
    builder._OPEN.clear()
    prefixes = []
    for k in range(3):
        p = str(tmp_path / f"src{k}")
        _make(p, [np.full(50, 100 * (k + 1) + j % 7) for j in range(30)])
        prefixes.append(p)
    w = [0.6, 0.3, 0.1]
    cfg = _cfg(
        tmp_path, train_data_paths=prefixes, train_data_weights=w, valid_data_paths=prefixes[:1]
    )
    train, valid, test = build_train_valid_test_datasets(cfg, 32, 3, (5000, 10, 0))
    assert len(train) == 5000 and test is None and len(valid) >= 10
    origin = np.array([int(train[i]["text"][0]) // 100 - 1 for i in range(5000)])
    frac = np.bincount(origin, minlength=3) / 5000
    assert np.all(np.abs(frac - np.array(w)) < 0.01 * np.array(w) + 1e-9)


def test_weights_must_match_paths(corpus, tmp_path) -> None:
    prefix, _ = corpus
    cfg = _cfg(tmp_path, train_data_paths=[prefix, prefix], train_data_weights=[1.0])
    with pytest.raises(
        DataError, match="train_data_weights has 1 entries but train_data_paths has 2"
    ):
        build_train_valid_test_datasets(cfg, 8, 1, (10, 0, 0))
    cfg = _cfg(tmp_path, train_data_paths=[prefix], train_data_weights=[-1.0])
    with pytest.raises(DataError, match="must be >= 0"):
        build_train_valid_test_datasets(cfg, 8, 1, (10, 0, 0))


def test_token_ids_beyond_vocab(corpus, tmp_path) -> None:
    prefix, _ = corpus
    with pytest.raises(
        DataError, match=r"c\.bin: contains token id 390\d\d >= tokenizer vocab size"
    ):
        build_train_valid_test_datasets(
            _cfg(tmp_path, data_path=prefix), 8, 1, (10, 0, 0), vocab_size=1000
        )
    builder._OPEN.clear()
    builder._FULL_VOCAB_SCAN_TOKENS, old = 0, builder._FULL_VOCAB_SCAN_TOKENS
    try:  # large corpora are checked per sample instead
        tr = build_train_valid_test_datasets(
            _cfg(tmp_path, data_path=prefix), 8, 1, (400, 0, 0), vocab_size=1000
        )[0]
        with pytest.raises(DataError, match=r"c\.bin: token id \d+ >= vocab size 1000"):
            for i in range(len(tr)):
                tr[i]
    finally:
        builder._FULL_VOCAB_SCAN_TOKENS = old


def test_missing_data_is_named(tmp_path) -> None:
    builder._OPEN.clear()
    with pytest.raises(DataError, match="nothere.idx: missing"):
        build_train_valid_test_datasets(
            _cfg(tmp_path, data_path=str(tmp_path / "nothere")), 8, 1, (1, 0, 0)
        )
    with pytest.raises(DataError, match="no data"):
        build_train_valid_test_datasets(_cfg(tmp_path), 8, 1, (1, 0, 0))


def test_too_few_tokens(tmp_path) -> None:
    builder._OPEN.clear()
    _make(str(tmp_path / "tiny"), [np.arange(5)])
    with pytest.raises(DataError, match="has 5 tokens; one sample needs"):
        build_train_valid_test_datasets(
            _cfg(tmp_path, data_path=str(tmp_path / "tiny"), split="1,0,0"), 8, 1, (1, 0, 0)
        )
