"""Cache options shared by tools/streaming/evaluate_ppl.py and generate.py, spelled as the
original Streaming-SepLLM command spells them.

    --enable_kv_cache_manager  --enable_SepLLM | --enable_StreamingLLM  [--enable_pos_shift]
    --init_cache_size a  --sep_cache_size s  --local_size w  --cache_size c  (one value, or
    a comma list with one value per layer)  [--grow_sep_cache]  [--separator_token_ids ...]

Without --enable_kv_cache_manager the cache is full (never evicts).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from megatron.inference.caches import Policy, make_policies


def int_or_list(text: str) -> int | list[int]:
    """'4' -> 4, '4,4,8' -> [4, 4, 8] (per-layer values)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected an integer or a comma list, got {text!r}"
        ) from e
    if not values:
        raise argparse.ArgumentTypeError("empty size")
    return values[0] if len(values) == 1 else values


def id_list(text: str) -> list[int]:
    try:
        return [int(v) for v in str(text).replace(" ", ",").split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"separator ids must be integers, got {text!r}") from e


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init_cache_size", type=int_or_list, default=4, help="a: initial tokens")
    p.add_argument("--sep_cache_size", type=int_or_list, default=64, help="s: separators")
    p.add_argument("--local_size", type=int_or_list, default=256, help="w: local window")
    p.add_argument("--cache_size", type=int_or_list, default=512, help="c: capacity")
    p.add_argument("--enable_kv_cache_manager", action="store_true", help="evict (else full)")
    p.add_argument("--enable_SepLLM", action="store_true", help="SepCache policy")
    p.add_argument("--enable_StreamingLLM", action="store_true", help="sink cache policy")
    p.add_argument("--enable_pos_shift", action="store_true", help="positions by cache index")
    p.add_argument("--grow_sep_cache", action="store_true", help="SepCache grow variant")
    p.add_argument(
        "--separator_token_ids",
        type=id_list,
        default=None,
        help="default: the model's config.json `sepllm` entry, else derived from its tokenizer",
    )


def cache_kind(args: argparse.Namespace) -> str:
    """'sep', 'sink' or 'full'; contradictory flags are an error."""
    if args.enable_SepLLM and args.enable_StreamingLLM:
        raise ValueError("--enable_SepLLM and --enable_StreamingLLM are mutually exclusive")
    if not args.enable_kv_cache_manager:
        return "full"
    if args.enable_SepLLM:
        return "sep"
    if args.enable_StreamingLLM:
        return "sink"
    raise ValueError("--enable_kv_cache_manager needs --enable_SepLLM or --enable_StreamingLLM")


def policies(args: argparse.Namespace, num_layers: int) -> list[Policy]:
    """One policy per layer from the options (raises on a + s + w >= c, list lengths)."""
    kind = cache_kind(args)
    return make_policies(
        kind,
        num_layers,
        args.init_cache_size,
        args.sep_cache_size,
        args.local_size,
        args.cache_size,
        grow=args.grow_sep_cache,
    )


def check_sizes(args: argparse.Namespace) -> None:
    """The size checks that need no model (run before loading anything)."""
    sizes: Sequence[int | list[int]] = (
        args.init_cache_size,
        args.sep_cache_size,
        args.local_size,
        args.cache_size,
    )
    n = max((len(v) for v in sizes if isinstance(v, list)), default=1)
    policies(args, n)
