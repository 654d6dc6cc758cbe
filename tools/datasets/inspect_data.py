#!/usr/bin/env python
"""Inspect a .bin/.idx dataset: counts and dtype; optionally decode a document or a sample.

Example:
    python tools/datasets/inspect_data.py data/shakespeare/shakespeare_text_document \
        --vocab-file data/shakespeare/tokenizer.json --doc 3 --max-tokens 200
"""

from __future__ import annotations

import argparse
import sys

from megatron.data.indexed_dataset import DataError
from megatron.data.inspect import inspect_dataset
from megatron.data.tokenizers import TOKENIZER_TYPES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("prefix", help="Dataset prefix (without .bin/.idx).")
    p.add_argument("--tokenizer-type", default="HFTokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--doc", type=int, default=None, help="Decode this document.")
    p.add_argument("--sample", type=int, default=None, help="Decode this packed training sample.")
    p.add_argument("--seq-length", type=int, default=2048, help="For --sample.")
    p.add_argument("--seed", type=int, default=1234, help="For --sample.")
    p.add_argument("--max-tokens", type=int, default=None, help="Decode at most this many.")
    p.add_argument("--scan", action="store_true", help="Full scan: max token id vs vocab.")
    a = p.parse_args(argv)
    errors: list[str] = []
    try:
        text = inspect_dataset(
            a.prefix,
            a.tokenizer_type,
            a.vocab_file,
            a.merge_file,
            a.doc,
            a.sample,
            a.seq_length,
            a.seed,
            a.max_tokens,
            a.scan,
            errors,
        )
    except (DataError, IndexError, OSError) as e:  # a missing or broken dataset: no traceback
        print(f"inspect_data.py: error: {e}", file=sys.stderr)
        return 1
    print(text)
    for e in errors:  # the scan found a problem: say so last, and exit non-zero
        print(f"inspect_data.py: error: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
