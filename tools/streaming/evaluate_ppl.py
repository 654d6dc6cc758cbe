"""Streaming perplexity with SepCache / sink / full caches (the original
`evaluate_streaming_inputs_perplexity.py` options: its flag syntax `--enable_SepLLM True`, or
bare `--enable_SepLLM`, and its defaults when a flag is omitted: SepCache 4 / 64 / 224 / 324
with positional shift), on our checkpoints or a transformers folder.

    python tools/streaming/evaluate_ppl.py --model_name_or_path checkpoints/tiny \
        --dataset_name bundled --num_eval_tokens 20000 --enable_kv_cache_manager True \
        --enable_SepLLM True --enable_StreamingLLM False --enable_pos_shift True \
        --init_cache_size 4 --sep_cache_size 32 --local_size 224 --cache_size 324 \
        --output_dir outputs/sepllm

--dataset_name: a local .txt / .jsonl / .parquet file, `bundled` (the Shakespeare corpus) or
a hub dataset (needs `datasets` and network). Writes summary.json, nll.txt,
ppl_checkpoints.json and ppl.png to --output_dir (docs/streaming.md).
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron.checkpoint import add_read_args, read_options
from megatron.common.accelerator import pin_cpu_accelerator
from megatron.inference.loading import Streamer, check_separator_ids, load_model
from megatron.inference.options import (
    ORIGINAL_DEFAULTS,
    add_cache_args,
    cache_kind,
    check_sizes,
    policies,
)
from megatron.inference.perplexity import (
    check_output_dir,
    check_scored,
    stream_nll,
    write_outputs,
)
from megatron.inference.texts import check_source, iter_texts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--dataset_name", default="bundled")
    p.add_argument("--task", default=None, help="hub dataset config name")
    p.add_argument("--split", default="test")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--num_eval_tokens", type=int, default=None)
    p.add_argument("--output_dir", default="outputs/streaming_ppl")
    p.add_argument("--chunk_size", type=int, default=1, help="tokens per forward (cut at room)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--overwrite", action="store_true", help="replace earlier results in --output_dir"
    )
    add_cache_args(p, ORIGINAL_DEFAULTS)  # the original's flags, syntax and defaults
    add_read_args(p)
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.chunk_size < 1:
        p.error("--num_samples and --chunk_size must be >= 1")
    if args.num_eval_tokens is not None and args.num_eval_tokens < 1:
        p.error("--num_eval_tokens must be >= 1")
    return args


def tokenized_samples(streamer: Streamer, args: argparse.Namespace) -> list[torch.Tensor]:
    if streamer.tokenizer is None:
        raise ValueError(f"{streamer.source} has no tokenizer to encode {args.dataset_name!r}")
    out: list[torch.Tensor] = []
    budget = args.num_eval_tokens
    for text in iter_texts(args.dataset_name, args.task, args.split):
        ids = torch.tensor(streamer.tokenizer.tokenize(text), dtype=torch.long)
        out.append(ids)
        budget = None if budget is None else budget - (len(ids) - 1)
        if len(out) >= args.num_samples or (budget is not None and budget <= 0):
            break
    if not out:
        raise ValueError(f"{args.dataset_name!r} has no text")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    kind = cache_kind(args)  # every check that needs no model, before loading it
    check_sizes(args)
    check_source(args.dataset_name)
    check_output_dir(args.output_dir, args.overwrite)  # before the work, not after it
    streamer = load_model(args.model_name_or_path, read_options(args))
    layer_policies = policies(args, streamer.num_layers)
    seps = args.separator_token_ids
    if seps is None:
        seps = streamer.default_separator_ids
    check_separator_ids(seps, streamer.vocab_size)
    device = torch.device(args.device)
    streamer.model.to(device)
    samples = [s.to(device) for s in tokenized_samples(streamer, args)]
    result = stream_nll(
        streamer,
        samples,
        lambda: streamer.new_cache(layer_policies, seps, args.enable_pos_shift),
        args.chunk_size,
        args.num_eval_tokens,
    )
    check_scored(result, args.num_eval_tokens, args.dataset_name)
    options = {
        **vars(args),
        "cache": kind,
        "separator_token_ids": list(seps),
        "world": streamer.world,
    }
    summary = write_outputs(args.output_dir, result, options, device)
    print(
        f"ppl {summary['ppl']:.4f} over {summary['num_tokens']} tokens, cache {kind}, peak "
        f"{summary['peak_cache_length']} keys, mean {summary['mean_cache_length']:.1f}, "
        f"{summary['tokens_per_s']:.1f} tok/s -> {args.output_dir}"
    )
    return summary


if __name__ == "__main__":
    pin_cpu_accelerator()  # DeepSpeed's CPU fallback without its "If you have GPU" warning
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
