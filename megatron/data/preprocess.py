"""Tokenize jsonl / txt (optionally .gz / .zst) into ``<prefix>_<key>_document.bin/.idx``.

The main process streams raw line batches to a pool of workers; each worker decodes, parses
and tokenizes a whole batch at once (``encode_batch`` in HF tokenizers is far faster than one
document at a time) and returns one flat numpy array plus document lengths, which the main
process appends to the output. Memory stays flat: at most a few batches are in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron.common.files import LockTimeout, file_lock
from megatron.data.indexed_dataset import DataError, IndexedDatasetBuilder, best_dtype
from megatron.data.readers import (
    check_input,
    input_format,
    iter_line_batches,
    open_binary,
    parse_lines,
)
from megatron.data.tokenizers import Tokenizer, make_tokenizer

log = logging.getLogger(__name__)

# Lines that are not documents (invalid JSON, non-UTF-8, no text under the key): more than
# this fraction of all lines means the input or --jsonl-keys is wrong, not a few stray lines.
MAX_BAD_FRACTION = 0.01
BAD_REASONS = ("invalid_json", "missing_key", "non_utf8")

_TOKENIZER: Tokenizer | None = None
_JOB: dict = {}


@dataclass
class PreprocessStats:
    output_prefix: str
    docs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.output_prefix}: {self.docs:,} documents, {self.tokens:,} tokens in "
            f"{self.seconds:.1f}s ({rate / 1e6:.2f} M tokens/s); skipped: {skipped}"
        )


def _init_worker(tok_type: str, vocab: str | None, merges: str | None, job: dict) -> None:
    global _TOKENIZER, _JOB
    if job.get("single_thread", True):
        # One core per worker: the tokenizers thread pool would otherwise fight the processes.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    _TOKENIZER = make_tokenizer(tok_type, vocab, merges)
    _JOB = job


def _encode(item: tuple[int, int, list[bytes]]) -> tuple[int, int, dict]:
    """Worker: one batch of raw lines -> per key (flat tokens, lengths, skip counts, examples)."""
    file_idx, first_line, lines = item
    tok = _TOKENIZER
    assert tok is not None
    out = {}
    for key in _JOB["keys"]:
        res = parse_lines(lines, first_line, _JOB["formats"][file_idx], key)
        ids = tok.tokenize_batch(res.texts) if res.texts else []
        if _JOB["append_eod"]:
            for x in ids:
                x.append(tok.eod)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        keep = lengths > 0  # a document that tokenizes to nothing is skipped, not written
        n_empty = int((~keep).sum())
        if n_empty:
            res.skipped["empty"] += n_empty
            lengths = lengths[keep]
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=_JOB["dtype"], count=int(lengths.sum())
        )
        out[key] = (flat, lengths, res.skipped, res.examples)
    return file_idx, len(lines), out


def _batches(
    inputs: list[str], batch_lines: int, whole_file_txt: bool
) -> Iterator[tuple[int, int, list[bytes]]]:
    for i, path in enumerate(inputs):
        if whole_file_txt and input_format(path) == "txt":
            with open_binary(path) as f:
                yield i, 1, [f.read()]  # the whole file is one document
            continue
        for first, lines in iter_line_batches(path, batch_lines):
            yield i, first, lines


def _bounded_imap(pool: Any, items: Iterator, max_in_flight: int) -> Iterator:
    """Ordered ``pool.imap`` with back-pressure: Pool.imap drains its input eagerly, which
    would read the whole corpus into memory; here at most ``max_in_flight`` batches exist."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(_encode, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _doc_format(path: str, txt_doc_per_file: bool) -> str:
    fmt = input_format(path)
    return "txtfile" if fmt == "txt" and txt_doc_per_file else fmt


def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_type: str,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    json_keys: tuple[str, ...] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    batch_lines: int = 256,
    txt_doc_per_file: bool = False,
    strict: bool = False,
    progress: bool = True,
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> dict[str, PreprocessStats]:
    """Tokenize ``inputs`` into one dataset per json key; returns per-key statistics.

    ``workers=0`` runs in-process (tests, tiny inputs). Bad lines (invalid JSON, non-UTF-8,
    missing key) are skipped and counted, or raise with file:line when ``strict``; more than
    ``max_bad_fraction`` of the lines bad is an error and nothing is written. Empty lines are
    skipped freely (paragraph breaks in text). One run at a time writes an output prefix.
    """
    if not inputs:
        raise ValueError("no input files")
    for p in inputs:
        check_input(p)
    with _output_lock(output_prefix):
        return _preprocess(
            inputs,
            output_prefix,
            tokenizer_type,
            vocab_file,
            merge_file,
            json_keys,
            append_eod,
            workers,
            batch_lines,
            txt_doc_per_file,
            strict,
            progress,
            max_bad_fraction,
        )


@contextlib.contextmanager
def _output_lock(output_prefix: str) -> Iterator[None]:
    """Two runs into one prefix would both succeed, the last rename winning: refuse the
    second, naming the first (the lock file `.<name>.preprocess.lock` stays, empty)."""
    head, name = os.path.split(os.path.abspath(output_prefix))
    os.makedirs(head, exist_ok=True)
    lock = os.path.join(head, f".{name}.preprocess.lock")
    try:
        with file_lock(lock, timeout_s=0):
            yield
    except LockTimeout as e:
        raise DataError(
            f"another preprocessing run is writing {output_prefix} ({e}); wait for it or give "
            "another --output-prefix"
        ) from None


def _preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_type: str,
    vocab_file: str | None,
    merge_file: str | None,
    json_keys: tuple[str, ...],
    append_eod: bool,
    workers: int,
    batch_lines: int,
    txt_doc_per_file: bool,
    strict: bool,
    progress: bool,
    max_bad_fraction: float,
) -> dict[str, PreprocessStats]:
    tok = make_tokenizer(tokenizer_type, vocab_file, merge_file)  # fails early on bad files
    dtype = best_dtype(tok.vocab_size)
    job = {
        "keys": list(json_keys),
        "formats": [_doc_format(p, txt_doc_per_file) for p in inputs],
        "append_eod": append_eod,
        "dtype": dtype,
        "single_thread": workers > 0,
    }
    stats = {k: PreprocessStats(output_prefix_for(output_prefix, k)) for k in json_keys}
    builders = {k: IndexedDatasetBuilder(stats[k].output_prefix, dtype) for k in json_keys}
    init = (tokenizer_type, vocab_file, merge_file, job)
    batches = _batches(inputs, batch_lines, txt_doc_per_file)
    start = time.perf_counter()
    pool = None
    try:
        if workers > 0:
            pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=init)
            results = _bounded_imap(pool, batches, max_in_flight=2 * workers + 2)
        else:
            _init_worker(*init)
            results = map(_encode, batches)
        _consume(results, inputs, builders, stats, strict, progress, start)
        _refuse_empty(stats, inputs)  # before finalize: no empty dataset is left behind
        _refuse_mostly_bad(stats, inputs, max_bad_fraction)
        for b in builders.values():
            b.finalize()
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    for s in stats.values():
        s.seconds = time.perf_counter() - start
        log.info(s.summary())
    return stats


def _refuse_empty(stats: dict[str, PreprocessStats], inputs: list[str]) -> None:
    """A key that produced no documents is an error, not a 0-document dataset: an empty file,
    a misspelled --jsonl-keys or a binary input would otherwise "succeed"."""
    empty = [s for s in stats.values() if s.docs == 0]
    if not empty:
        return
    parts = []
    for s in empty:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items())) or "no lines read"
        first = f"; first: {s.examples[0]}" if s.examples else ""
        parts.append(f"{s.output_prefix}: 0 documents (skipped: {skipped}{first})")
    raise DataError(
        f"preprocessing {', '.join(inputs)} produced no documents, nothing written:\n  "
        + "\n  ".join(parts)
        + "\nCheck that the input is UTF-8 jsonl / txt and that --jsonl-keys names its text field."
    )


def _refuse_mostly_bad(
    stats: dict[str, PreprocessStats], inputs: list[str], max_fraction: float
) -> None:
    for s in stats.values():
        bad = sum(s.skipped[r] for r in BAD_REASONS)
        lines = s.docs + sum(s.skipped.values())
        if bad > max_fraction * lines:
            counts = ", ".join(f"{r}={s.skipped[r]}" for r in BAD_REASONS if s.skipped[r])
            first = f"; first: {s.examples[0]}" if s.examples else ""
            raise DataError(
                f"preprocessing {', '.join(inputs)}: {bad:,} of {lines:,} lines are not "
                f"documents ({counts}{first}), more than {max_fraction:.0%}; nothing written to "
                f"{s.output_prefix}. Fix the input or --jsonl-keys, or raise "
                "--max-bad-fraction to keep the good lines"
            )


def _consume(
    results: Iterator[tuple[int, int, dict]],
    inputs: list[str],
    builders: dict[str, IndexedDatasetBuilder],
    stats: dict[str, PreprocessStats],
    strict: bool,
    progress: bool,
    start: float,
) -> None:
    from tqdm import tqdm

    bar = tqdm(unit=" docs", disable=not progress, file=sys.stderr, mininterval=1.0)
    key0 = next(iter(stats))
    for file_idx, _n_lines, out in results:
        for key, (flat, lengths, skipped, examples) in out.items():
            s = stats[key]
            for line, reason in examples:
                msg = f"{inputs[file_idx]}:{line}: {reason} (key {key!r})"
                if strict:
                    raise DataError(f"{msg}; rerun without --strict to skip and count such lines")
                if len(s.examples) < 20:
                    s.examples.append(msg)
                    log.warning("skipping %s", msg)
            s.skipped.update(skipped)
            if len(lengths):
                builders[key].add_documents(flat, lengths)
            s.docs += len(lengths)
            s.tokens += int(flat.size)
        dt = max(time.perf_counter() - start, 1e-9)
        bar.update(len(out[key0][1]))
        bar.set_postfix_str(
            f"{stats[key0].docs / dt:,.0f} docs/s {stats[key0].tokens / dt / 1e6:.2f} M tok/s",
            refresh=False,
        )
    bar.close()
