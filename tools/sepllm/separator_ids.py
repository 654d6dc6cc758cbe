"""Print the SepLLM separator token ids of a tokenizer, built exactly as training builds it.

    python tools/sepllm/separator_ids.py data/shakespeare/tokenizer.json --extended
    python tools/sepllm/separator_ids.py --config configs/tiny.yml configs/tiny_sepllm.yml
    python tools/sepllm/separator_ids.py            # GPT-2 BPE shipped with whisper

The tokenizer comes from megatron.data.tokenizers, the code that tokenizes the data: from a
file (tokenizer.json, .tiktoken, SentencePiece .model, or vocab.json with --merge-file; the
type is inferred unless --tokenizer-type is given) or, with --config, from the config's data
section (`build_tokenizer(cfg.data)`, after preparing a bundled corpus as train.py does); then
the config's `sepllm.separator_token_ids` is checked against the derived list.

Prints one `id  'text'` line per separator token, then a YAML line to paste into a config.
"""

from __future__ import annotations

import argparse
import sys

from megatron.config.loader import ConfigError, build_config, merge_sources
from megatron.config.sources import gather_sources
from megatron.data.bundled import prepare_bundled_data
from megatron.data.tokenizers import (
    TOKENIZER_TYPES,
    Tokenizer,
    build_tokenizer,
    default_tiktoken_file,
    infer_tokenizer_type,
    make_tokenizer,
)
from megatron.sepllm.separators import format_table, separator_tokens


def _from_config(paths: list[str], overrides: list[str]) -> tuple[Tokenizer, str, list[int]]:
    sources, _ = gather_sources(paths, overrides)
    cfg = build_config(merge_sources(sources))
    prepare_bundled_data(cfg)
    d = cfg.data
    what = f"{d.tokenizer_type} {d.vocab_file or ''} (data section of {' + '.join(paths)})"
    return build_tokenizer(d), what, list(cfg.sepllm.separator_token_ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("tokenizer", nargs="?", help="tokenizer file (default: gpt2.tiktoken)")
    ap.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, help="default: from the file")
    ap.add_argument("--merge-file", help="merges.txt, with vocab.json as the tokenizer file")
    ap.add_argument(
        "--config", nargs="+", metavar="YAML", help="use the data section of these configs"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--extended", action="store_true", help="add ' .', space/newline runs ...")
    args = ap.parse_args(argv)
    configured: list[int] | None = None
    try:
        if args.config:
            if args.tokenizer:
                ap.error("give a tokenizer file or --config, not both")
            tok, what, configured = _from_config(args.config, args.set)
        else:
            path = args.tokenizer or default_tiktoken_file()
            if path is None:
                print("no tokenizer given and gpt2.tiktoken not found", file=sys.stderr)
                return 2
            kind = args.tokenizer_type or infer_tokenizer_type(path, args.merge_file)
            tok, what = make_tokenizer(kind, path, args.merge_file), f"{kind} {path}"
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"separator_ids.py: {exc}", file=sys.stderr)
        return 2
    tokens = separator_tokens(tok, extended=args.extended)
    ids = [t.id for t in tokens]
    print(f"# separators of {what}")
    print(format_table(tokens))
    print(f"separator_token_ids: {ids}")
    if configured is not None and configured != ids:
        print(
            f"# the config's sepllm.separator_token_ids {configured} differ from these",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
