"""Build train / valid / test datasets from a ``DataConfig``.

Either ``data_path`` (one prefix, split by document into ``split`` proportions) or
``train/valid/test_data_paths`` with optional ``*_data_weights`` (blended). Each split provides
at least the requested number of samples (epochs repeat as needed, Megatron-style).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from megatron.data.blendable import BlendableDataset
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import DataError, MMapIndexedDataset

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
# Each blended component gets a little more than its share (Megatron uses 0.5%), plus one.
_BLEND_MARGIN = 1.005
# Full-scan the token stream for ids >= vocab_size when the corpus is at most this large;
# larger corpora are checked sample by sample as they are read.
_FULL_VOCAB_SCAN_TOKENS = 1_000_000_000


def parse_split(split: str) -> list[float]:
    """'969,30,1' (or '0.9/0.1/0') -> normalised [train, valid, test] fractions."""
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"split {split!r}: expected numbers like '969,30,1'") from e
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"split {split!r}: proportions must be >= 0 with a positive sum")
    total = sum(parts)
    return [p / total for p in parts]


def split_boundaries(split: str, num_docs: int) -> list[int]:
    """Document boundaries [0, a, b, num_docs] exactly as Megatron rounds them."""
    index = [0]
    for frac in parse_split(split):
        index.append(index[-1] + int(round(frac * float(num_docs))))
    diff = index[-1] - num_docs
    return [index[0]] + [i - diff for i in index[1:]]


_OPEN: dict[str, MMapIndexedDataset] = {}


def open_indexed(prefix: str, vocab_size: int | None = None) -> MMapIndexedDataset:
    """Open (once per process) and validate a .bin/.idx pair."""
    if prefix not in _OPEN:
        ds = MMapIndexedDataset(prefix)
        if vocab_size is not None and ds.num_tokens <= _FULL_VOCAB_SCAN_TOKENS:
            low, top = ds.token_range()
            if low < 0:
                raise DataError(
                    f"{prefix}.bin: contains negative token id {low} (its .idx names dtype "
                    f"{ds.dtype.__name__}: written as another dtype and relabelled?)"
                )
            if top >= vocab_size:
                raise DataError(
                    f"{prefix}.bin: contains token id {top} >= tokenizer vocab size {vocab_size} "
                    f"(data tokenized with a different tokenizer?)"
                )
        _OPEN[prefix] = ds
    return _OPEN[prefix]


def _single(
    name: str,
    prefix: str,
    docs: np.ndarray | None,
    n: int,
    seq_length: int,
    seed: int,
    cfg: Any,
    vocab_size: int | None,
) -> GPTDataset:
    ds = open_indexed(prefix, vocab_size)
    documents = np.arange(len(ds), dtype=np.int64) if docs is None else docs
    return GPTDataset(name, ds, documents, n, seq_length, seed, cfg.data_cache_dir, vocab_size)


def _blend(
    name: str,
    paths: list[str],
    weights: list[float],
    n: int,
    seq_length: int,
    seed: int,
    cfg: Any,
    vocab_size: int | None,
) -> GPTDataset | BlendableDataset:
    if weights and len(weights) != len(paths):
        raise DataError(
            f"{name}_data_weights has {len(weights)} entries but {name}_data_paths has "
            f"{len(paths)} ({paths})"
        )
    w = np.asarray(weights if weights else [1.0] * len(paths), dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0 or not np.all(np.isfinite(w)):
        raise DataError(f"{name}_data_weights {list(weights)} must be >= 0 with a positive sum")
    w = w / w.sum()
    if len(paths) == 1:
        return _single(name, paths[0], None, n, seq_length, seed, cfg, vocab_size)
    parts = [
        _single(
            name, p, None, math.ceil(n * wi * _BLEND_MARGIN) + 1, seq_length, seed, cfg, vocab_size
        )
        for p, wi in zip(paths, w)
    ]
    return BlendableDataset(parts, w, n)


def build_train_valid_test_datasets(
    cfg: Any,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    vocab_size: int | None = None,
) -> tuple[Any, Any, Any]:
    """Datasets whose item i is ``{"text": int64[seq_length + 1]}``; None for an empty split.

    ``vocab_size`` (the tokenizer's, optional) enables the check for token ids out of range.
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    out: list[Any] = [None, None, None]
    if cfg.data_path:
        if cfg.train_data_paths or cfg.valid_data_paths or cfg.test_data_paths:
            raise DataError("set either data_path or train/valid/test_data_paths, not both")
        ds = open_indexed(cfg.data_path, vocab_size)
        bounds = split_boundaries(cfg.split, len(ds))
        for i, name in enumerate(SPLIT_NAMES):
            docs = np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
            if num_samples[i] <= 0:
                continue
            if len(docs) == 0 and name == "train":
                # Training needs samples: stop here, not later on len(None) in the loop.
                raise DataError(
                    f"{cfg.data_path}: split {cfg.split!r} gives the train split no documents "
                    f"(the dataset has {len(ds)}); give train a larger share in `split` "
                    "(e.g. 969,30,1) or use a larger dataset"
                )
            if len(docs) == 0:
                log.warning(
                    "%s: split %r gets no documents from %s (%d documents, split %s)",
                    cfg.data_path,
                    name,
                    cfg.data_path,
                    len(ds),
                    cfg.split,
                )
                continue
            out[i] = _single(
                name, cfg.data_path, docs, num_samples[i], seq_length, seed, cfg, vocab_size
            )
        return tuple(out)  # type: ignore[return-value]
    lists = (cfg.train_data_paths, cfg.valid_data_paths, cfg.test_data_paths)
    weights = (cfg.train_data_weights, cfg.valid_data_weights, cfg.test_data_weights)
    if not any(lists):
        raise DataError("no data: set data_path or train_data_paths (or prepare_data)")
    if not lists[0] and num_samples[0] > 0:
        raise DataError(
            "valid/test_data_paths are set but train_data_paths is not: nothing to train on"
        )
    for i, name in enumerate(SPLIT_NAMES):
        if lists[i] and num_samples[i] > 0:
            out[i] = _blend(
                name,
                list(lists[i]),
                list(weights[i]),
                num_samples[i],
                seq_length,
                seed,
                cfg,
                vocab_size,
            )
    return tuple(out)  # type: ignore[return-value]
