"""Print the SepLLM separator token ids of a tokenizer (HF tokenizer.json or .tiktoken file).

    python tools/sepllm/separator_ids.py data/shakespeare/tokenizer.json --extended
    python tools/sepllm/separator_ids.py            # GPT-2 BPE shipped with whisper

Prints one `id  'text'` line per separator token, then a YAML line to paste into a config.
"""

from __future__ import annotations

import argparse
import sys

from megatron.sepllm.separators import (
    GPT2_PAT,
    default_tiktoken_file,
    format_table,
    separator_ids_for_file,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("tokenizer", nargs="?", help="tokenizer.json or .tiktoken (default: gpt2)")
    ap.add_argument("--extended", action="store_true", help="add ' .', space/newline runs ...")
    ap.add_argument(
        "--gpt2-pat", action="store_true", help="force GPT-2's split pattern (tiktoken)"
    )
    args = ap.parse_args(argv)
    path = args.tokenizer or default_tiktoken_file()
    if path is None:
        print("no tokenizer given and gpt2.tiktoken not found", file=sys.stderr)
        return 2
    tokens = separator_ids_for_file(
        path, extended=args.extended, pat=GPT2_PAT if args.gpt2_pat else None
    )
    print(f"# separators of {path}")
    print(format_table(tokens))
    print(f"separator_token_ids: {[t.id for t in tokens]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
