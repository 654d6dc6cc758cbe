"""Packed GPT samples over an indexed dataset (Megatron GPT2Dataset semantics).

Documents are shuffled per epoch (``doc_idx``), cut into windows of seq_length + 1 tokens that
cross document boundaries (``sample_idx``), and windows are shuffled (``shuffle_idx``). The three
arrays depend only on (data, document range, num_samples, seq_length, seed); they are built
once, cached as .npy files (written under a temporary name, then renamed) and memory-mapped, so
item i is a pure function of i and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from megatron.common.files import atomic_path
from megatron.data.helpers import build_sample_idx
from megatron.data.indexed_dataset import DataError, MMapIndexedDataset, index_file_path

log = logging.getLogger(__name__)

# Megatron: give the last epoch its own shuffle when less than 80% of it is needed, so the
# samples the run actually sees are spread over the whole corpus.
_SEPARATE_LAST_EPOCH_FRACTION = 0.80


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def build_doc_idx(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool
) -> np.ndarray:
    if not separate_last or num_epochs == 1:
        doc_idx = np.tile(documents.astype(np.int64), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate([first, last])


def build_shuffle_idx(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_index_arrays(
    sizes: np.ndarray, documents: np.ndarray, seq_length: int, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) exactly as Megatron's _build_index_mappings."""
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate_last = False
    from_full_epochs = 0
    if num_epochs > 1:
        from_full_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        last_epoch_samples = num_samples - from_full_epochs
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_last = last_epoch_samples < int(_SEPARATE_LAST_EPOCH_FRACTION * per_epoch)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate_last)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total_samples)
    shuffled = from_full_epochs if separate_last else total_samples
    shuffle_idx = build_shuffle_idx(shuffled, total_samples, rng)
    return doc_idx, sample_idx, shuffle_idx


def _writable_dir(preferred: str) -> str:
    try:
        os.makedirs(preferred, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = os.path.join(os.path.expanduser("~"), ".cache", "sepneox", "index_cache")
    os.makedirs(fallback, exist_ok=True)
    return fallback


def _save_npy(path: str, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr)


def _load_index_arrays(paths: list[str], num_docs: int) -> tuple[np.ndarray, ...]:
    """The cached (doc_idx, sample_idx, shuffle_idx), memory-mapped, after a check of their
    types, shapes and value ranges (a tampered or foreign file fails here, named, instead of
    as a numpy pickle error or an IndexError mid-run)."""
    arrays = []
    for p in paths:
        try:
            arrays.append(np.load(p, mmap_mode="r"))
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"index cache {p} is unreadable ({e})") from None
    doc, sample, shuffle = arrays
    checks = [
        (doc, doc.ndim == 1 and doc.dtype.kind in "iu", 0, num_docs),
        (
            sample,
            sample.ndim == 2 and sample.shape[1:] == (2,) and sample.dtype.kind in "iu",
            None,
            None,
        ),
        (shuffle, shuffle.ndim == 1 and shuffle.dtype.kind in "iu", 0, len(sample) - 1),
    ]
    for p, (a, shape_ok, low, high) in zip(paths, checks):
        if not shape_ok:
            raise DataError(f"index cache {p} holds {a.dtype} {a.shape}, not an index array")
        if low is not None and a.size and (int(a.min()) < low or int(a.max()) >= high):
            raise DataError(f"index cache {p} holds values outside [{low}, {high})")
    if sample.size and (int(sample[:, 0].min()) < 0 or int(sample[:, 0].max()) >= len(doc)):
        raise DataError(f"index cache {paths[1]} points outside {paths[0]}")
    return doc, sample, shuffle


class GPTDataset:
    """Map-style dataset: ``ds[i] == {"text": int64 array of seq_length + 1 tokens}``."""

    def __init__(
        self,
        name: str,
        indexed: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.name, self.indexed, self.seq_length = name, indexed, seq_length
        self.vocab_size = vocab_size
        if len(documents) == 0:
            raise DataError(f"{indexed.prefix}: split {name!r} has no documents")
        if int(documents.min()) < 0 or int(documents.max()) >= len(indexed):
            raise DataError(f"{indexed.prefix}: document range outside the dataset")
        tokens = int(indexed.sizes[documents].sum(dtype=np.int64))
        if tokens < seq_length + 1:
            raise DataError(
                f"{indexed.prefix}: split {name!r} has {tokens} tokens; one sample needs "
                f"seq_length + 1 = {seq_length + 1}"
            )
        arrays = self._load_or_build(documents, num_samples, seed, cache_dir)
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays

    def _load_or_build(
        self, documents: np.ndarray, num_samples: int, seed: int, cache_dir: str | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        prefix = self.indexed.prefix
        st = os.stat(index_file_path(prefix))
        desc = {
            "prefix": os.path.abspath(prefix),
            "idx_size": st.st_size,
            "idx_mtime_ns": st.st_mtime_ns,
            "documents": [int(documents[0]), int(documents[-1]) + 1, len(documents)],
            "num_samples": int(num_samples),
            "seq_length": int(self.seq_length),
            "seed": int(seed),
            "format": 1,
        }
        key = hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
        beside = os.path.join(os.path.dirname(desc["prefix"]), "index-cache")
        root = _writable_dir(cache_dir or beside)
        base = os.path.join(root, f"{os.path.basename(prefix)}_{self.name}_{key}")
        paths = [f"{base}_{n}_idx.npy" for n in ("doc", "sample", "shuffle")]
        loaded = None
        if all(os.path.exists(p) for p in paths):
            try:
                loaded = _load_index_arrays(paths, len(self.indexed))
            except DataError as e:  # derived data: rebuilt, but never used unchecked
                log.warning("%s; rebuilding it", e)
        if loaded is None:
            log.info("building %s index arrays for %s (%d samples)", self.name, prefix, num_samples)
            built = build_index_arrays(
                self.indexed.sizes, documents, self.seq_length, num_samples, seed
            )
            for p, arr in zip(paths, built):
                _save_npy(p, arr)
            with open(base + "_desc.json", "w") as f:
                json.dump(desc, f, indent=1)
            loaded = _load_index_arrays(paths, len(self.indexed))
        return loaded

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name} sample {i} out of range [0, {len(self)})")
        j = int(self.shuffle_idx[i])
        f, off_f = (int(x) for x in self.sample_idx[j])
        last, off_l = (int(x) for x in self.sample_idx[j + 1])
        get = self.indexed.get
        if f == last:
            parts = [get(int(self.doc_idx[f]), off_f, off_l - off_f + 1)]
        else:
            parts = [get(int(self.doc_idx[f]), off_f)]
            parts += [get(int(self.doc_idx[k])) for k in range(f + 1, last)]
            parts.append(get(int(self.doc_idx[last]), 0, off_l + 1))
        text = np.concatenate(parts).astype(np.int64)
        if text.size and int(text.min()) < 0:
            docs = sorted({int(self.doc_idx[k]) for k in range(f, last + 1)})
            raise DataError(
                f"{self.indexed.prefix}.bin: negative token id {int(text.min())} in document(s) "
                f"{docs[:5]} (the .idx names dtype {np.dtype(self.indexed.dtype)}: relabelled?)"
            )
        if self.vocab_size is not None and text.size and int(text.max()) >= self.vocab_size:
            docs = sorted({int(self.doc_idx[k]) for k in range(f, last + 1)})
            raise DataError(
                f"{self.indexed.prefix}.bin: token id {int(text.max())} >= vocab size "
                f"{self.vocab_size} in document(s) {docs[:5]} (wrong tokenizer for this data?)"
            )
        return {"text": text}
