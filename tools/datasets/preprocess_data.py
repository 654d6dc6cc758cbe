#!/usr/bin/env python
"""Tokenize jsonl / txt (.gz, .zst) into Megatron/NeoX .bin/.idx (NeoX-compatible flags).

Example:
    python tools/datasets/preprocess_data.py --input data.jsonl --output-prefix data/mydata \
        --tokenizer-type HFTokenizer --vocab-file tokenizer.json --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron.data.indexed_dataset import DataError
from megatron.data.preprocess import MAX_BAD_FRACTION, preprocess
from megatron.data.tokenizers import TOKENIZER_TYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="Comma-separated input files.")
    p.add_argument("--output-prefix", required=True, help="Writes <prefix>_<key>_document.*")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"], help="JSON fields to tokenize.")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--append-eod", action="store_true", help="Append EOD after each document.")
    p.add_argument("--workers", type=int, default=1, help="Tokenizer processes (0 = in-process).")
    p.add_argument("--batch-lines", type=int, default=256, help="Lines per worker task.")
    p.add_argument("--txt-doc-per-file", action="store_true", help=".txt: one document per file.")
    p.add_argument("--strict", action="store_true", help="Stop at the first bad line.")
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=MAX_BAD_FRACTION,
        help="Fail when more than this fraction of the lines are bad (invalid JSON, non-UTF-8,"
        f" no text under the key; empty lines do not count). Default {MAX_BAD_FRACTION}.",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    a = parse_args(argv)
    try:
        stats = run(a)
    except DataError as exc:  # a clear message and a non-zero exit, no traceback
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 1
    for s in stats.values():
        print(s.summary())
    return 0


def run(a: argparse.Namespace) -> dict:
    return preprocess(
        inputs=[s for s in a.input.split(",") if s],
        output_prefix=a.output_prefix,
        tokenizer_type=a.tokenizer_type,
        vocab_file=a.vocab_file,
        merge_file=a.merge_file,
        json_keys=tuple(a.jsonl_keys),
        append_eod=a.append_eod,
        workers=a.workers,
        batch_lines=a.batch_lines,
        txt_doc_per_file=a.txt_doc_per_file,
        strict=a.strict,
        progress=not a.no_progress,
        max_bad_fraction=a.max_bad_fraction,
    )


if __name__ == "__main__":
    sys.exit(main())
