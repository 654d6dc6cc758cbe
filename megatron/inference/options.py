"""Cache options shared by tools/streaming/evaluate_ppl.py and generate.py, spelled as the
original Streaming-SepLLM command spells them.

    --enable_kv_cache_manager True  --enable_SepLLM True | --enable_StreamingLLM True
    --enable_pos_shift True|False  (each switch also bare: `--enable_SepLLM` = True)
    --init_cache_size a  --sep_cache_size s  --local_size w  --cache_size c  (one value, or
    a comma list with one value per layer)  [--grow_sep_cache]  [--separator_token_ids ...]

evaluate_ppl.py defaults to the original's values (ORIGINAL_DEFAULTS), generate.py to a full
cache. With --enable_kv_cache_manager False the cache is full (never evicts).
"""

from __future__ import annotations

import argparse
import warnings
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


def str2bool(text: str) -> bool:
    """The original's boolean flag values (its utils.str2bool)."""
    value = str(text).lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# The original evaluate_streaming_inputs_perplexity.py's defaults (sepllm_kv_cache/utils.py):
# SepCache on, a 4 / s 64 / w 224 / c 324, positional shift on.
ORIGINAL_DEFAULTS = {
    "init_cache_size": 4,
    "sep_cache_size": 64,
    "local_size": 224,
    "cache_size": 324,
    "enable_kv_cache_manager": True,
    "enable_SepLLM": True,
    "enable_StreamingLLM": False,
    "enable_pos_shift": True,
}
# generate.py's: a full cache unless asked (sizes used once --enable_kv_cache_manager is on).
GENERATE_DEFAULTS = {
    **ORIGINAL_DEFAULTS,
    "local_size": 256,
    "cache_size": 512,
    "enable_kv_cache_manager": False,
    "enable_SepLLM": False,
    "enable_pos_shift": False,
}

_SWITCHES = (
    ("enable_kv_cache_manager", "evict (else a full cache)"),
    ("enable_SepLLM", "SepCache policy"),
    ("enable_StreamingLLM", "sink cache policy"),
    ("enable_pos_shift", "positions by cache index (else kept where computed)"),
)


def add_cache_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The cache options; switches take the original's `--flag True/False` or bare `--flag`."""
    d = defaults or GENERATE_DEFAULTS
    for name, meaning in (
        ("init_cache_size", "a: initial tokens"),
        ("sep_cache_size", "s: separators"),
        ("local_size", "w: local window"),
        ("cache_size", "c: capacity"),
    ):
        p.add_argument(
            f"--{name}", type=int_or_list, default=d[name], help=f"{meaning} ({d[name]})"
        )
    for name, meaning in _SWITCHES:
        p.add_argument(
            f"--{name}",
            type=str2bool,
            nargs="?",
            const=True,
            default=d[name],
            metavar="True|False",
            help=f"{meaning} (default {d[name]})",
        )
    p.add_argument("--grow_sep_cache", action="store_true", help="SepCache grow variant")
    p.set_defaults(cache_defaults=d)  # cache_kind tells a chosen switch from a default one
    p.add_argument(
        "--separator_token_ids",
        type=id_list,
        default=None,
        help="default: the model's config.json `sepllm` entry, else derived from its tokenizer",
    )


def cache_kind(args: argparse.Namespace) -> str:
    """'sep', 'sink' or 'full'; contradictory flags are an error."""
    if args.enable_SepLLM and args.enable_StreamingLLM:
        raise ValueError(
            "--enable_SepLLM and --enable_StreamingLLM are mutually exclusive (evaluate_ppl.py, "
            "like the original, has --enable_SepLLM True by default: add --enable_SepLLM False)"
        )
    if not args.enable_kv_cache_manager:
        # Only a switch the user turned on: evaluate_ppl.py's SepLLM is on by default.
        defaults = getattr(args, "cache_defaults", {})
        chosen = [
            f
            for f in ("SepLLM", "StreamingLLM")
            if getattr(args, f"enable_{f}") and not defaults.get(f"enable_{f}")
        ]
        if chosen:  # the original's rule, said once instead of silently
            warnings.warn(
                f"--enable_{chosen[0]} takes effect only with --enable_kv_cache_manager: this "
                "run uses the full cache",
                stacklevel=2,
            )
        return "full"
    if args.enable_SepLLM:
        return "sep"
    if args.enable_StreamingLLM:
        return "sink"
    raise ValueError(
        "--enable_kv_cache_manager needs --enable_SepLLM True or --enable_StreamingLLM True"
    )


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
