#!/usr/bin/env python
"""Train a byte-level BPE (tokenizer.json) or SentencePiece (.model) tokenizer.

Example:
    python tools/train_tokenizer.py --input a.jsonl b.txt --type bpe --vocab-size 8192 \
        --output data/tok/tokenizer.json
"""

from __future__ import annotations

import argparse
import sys

from megatron.data.tokenizer_training import train_bpe, train_spm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".txt (one doc per file) or .jsonl")
    p.add_argument("--type", choices=["bpe", "spm"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--json-key", default="text")
    p.add_argument(
        "--output", required=True, help="bpe: tokenizer.json path; spm: model prefix (.model added)"
    )
    a = p.parse_args(argv)
    if a.type == "bpe":
        out = train_bpe(a.input, a.output, a.vocab_size, a.json_key)
    else:
        out = train_spm(a.input, a.output, a.vocab_size, a.json_key)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
