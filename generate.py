"""Generate text with any streaming cache, from our checkpoints or transformers folders.

    python generate.py --model_name_or_path checkpoints/tiny --prompt "ROMEO:" --maximum_tokens 64
    python generate.py --model_name_or_path hf_folder --sample_input_file prompts.txt \
        --sample_output_file out.jsonl --enable_kv_cache_manager --enable_SepLLM --enable_pos_shift
    python generate.py --model_name_or_path checkpoints/tiny --text_gen_type interactive
    python generate.py configs/tiny.yml configs/text_generation.yml        # NeoX style

    python generate.py -d configs tiny.yml text_generation.yml -i prompts.txt -o out.jsonl

NeoX style: the YAMLs hold the model config (its `load`, else `save`, is the checkpoint) and
NeoX's text_generation.yml keys `text_gen_type: unconditional | input-file | interactive`,
`sample_input_file`, `sample_output_file`, `maximum_tokens`, `prompt_end`, `temperature`,
`top_p`, `top_k`, `num_samples`, `recompute` (plus the cache options of docs/streaming.md
under the same names as on the command line, and `overwrite`). Tokens are printed as they are
produced; the results of every mode go to sample_output_file (input-file: samples.jsonl when
unset) as JSON lines {"context", "text"}, written atomically; an existing file is refused
before any work unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from megatron.checkpoint import READ_ERRORS, add_read_args, read_options
from megatron.common.accelerator import pin_cpu_accelerator
from megatron.common.files import atomic_write_text
from megatron.config.loader import ConfigError, build_config, merge_sources, read_yaml
from megatron.inference.loading import Streamer, check_separator_ids, load_model
from megatron.inference.options import add_cache_args, check_sizes, policies
from megatron.inference.sampling import Sampling, generate
from megatron.inference.texts import read_text_file

GEN_TYPES = ("unconditional", "input-file", "interactive")
GEN_DEFAULTS: dict[str, Any] = {
    "text_gen_type": None,
    "sample_input_file": None,
    "sample_output_file": None,
    "maximum_tokens": 64,
    "temperature": 1.0,
    "top_p": 0.0,
    "top_k": 0,
    "num_samples": 1,
    "prompt_end": "\n",
    "recompute": False,
    "overwrite": False,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", help="NeoX style: model + text_generation YAMLs")
    p.add_argument("-d", "--conf_dir", default=None, help="directory the YAML names are in")
    p.add_argument("--model_name_or_path", default=None)
    p.add_argument("--prompt", default=None, help="one prompt (else text_gen_type decides)")
    p.add_argument("--text_gen_type", choices=GEN_TYPES, default=None)
    p.add_argument("-i", "--sample_input_file", default=None)
    p.add_argument(
        "-o", "--sample_output_file", default=None, help="JSON lines {context, text}, any mode"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--prompt_end", default=None, help="prompt separator of an input file")
    p.add_argument(
        "--recompute",
        action="store_true",
        default=None,
        help="NeoX: recompute attention instead of caching; same tokens (full cache only)",
    )
    p.add_argument("--maximum_tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--num_samples", type=int, default=None)
    p.add_argument("--chunk_size", type=int, default=64, help="prompt tokens per forward")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu")
    add_cache_args(p)
    add_read_args(p)
    return p.parse_args(argv)


def _yaml_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The generation / cache keys of the YAMLs, and the checkpoint the model config names."""
    ours = set(GEN_DEFAULTS) | set(vars(parse_args([])))
    gen: dict[str, Any] = {}
    rest = []
    for path in [os.path.join(args.conf_dir or "", c) for c in args.configs]:
        raw = read_yaml(path)
        model_part = {}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name in ours:
                gen[name] = value
            else:
                model_part[key] = value
        rest.append((path, model_part))
    if not rest:
        return gen, None
    cfg = build_config(merge_sources(rest))
    return gen, cfg.checkpoint.load or cfg.checkpoint.save


def settings(argv: list[str]) -> argparse.Namespace:
    """Command line over YAML over defaults; every check before the model loads."""
    args = parse_args(argv)
    gen, ckpt = _yaml_settings(args)
    defaults = vars(parse_args([]))
    for key, value in gen.items():  # a YAML value applies where the command line kept the default
        if getattr(args, key, None) == defaults.get(key):
            setattr(args, key, value)
    for key, value in GEN_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.model_name_or_path = args.model_name_or_path or ckpt
    if not args.model_name_or_path:
        raise ValueError("no model: pass --model_name_or_path or a config with `load`")
    if args.text_gen_type is None:
        args.text_gen_type = "input-file" if args.sample_input_file else "unconditional"
    if args.text_gen_type not in GEN_TYPES:
        raise ValueError(f"text_gen_type {args.text_gen_type!r}: one of {GEN_TYPES}")
    if args.text_gen_type == "input-file" and args.sample_output_file is None:
        args.sample_output_file = "samples.jsonl"  # NeoX writes input-file results somewhere
    if args.text_gen_type == "input-file" and args.prompt is None:
        if not args.sample_input_file or not os.path.isfile(args.sample_input_file):
            raise FileNotFoundError(f"sample_input_file {args.sample_input_file!r} does not exist")
    check_sizes(args)
    _check_counts(args)
    _check_recompute(args)
    _check_output(args.sample_output_file, args.overwrite)
    args.sampling = Sampling(args.temperature, args.top_k, args.top_p, args.maximum_tokens)
    args.prompt_list = _prompts(args)  # read now: a bad prompts file fails before the model
    return args


def _check_counts(args: argparse.Namespace) -> None:
    """Counts that would otherwise give rc 0 and nothing (0 samples) or a traceback."""
    for name in ("num_samples", "chunk_size"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_recompute(args: argparse.Namespace) -> None:
    """NeoX's `recompute: true` recomputes every key each step: the same tokens as a full
    cache, so it is accepted as one; it cannot be combined with an evicting cache."""
    if args.recompute not in (True, False):
        raise ValueError(f"recompute must be true or false, got {args.recompute!r}")
    if args.recompute and args.enable_kv_cache_manager:
        raise ValueError(
            "recompute: true recomputes attention over the whole text; it cannot be combined "
            "with an evicting cache (--enable_kv_cache_manager)"
        )
    if args.recompute:
        print("generate.py: recompute: true gives the same tokens as the full cache used here")


def _check_output(path: str | None, overwrite: bool) -> None:
    """Before any work: the output file's folder exists and an existing file is not replaced
    unless asked (the file itself is written atomically at the end)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sample_output_file {path}: folder {folder} does not exist")
    if os.path.exists(path) and not overwrite:
        raise ValueError(
            f"sample_output_file {path} exists; pass --overwrite (or `overwrite: true`) to "
            "replace it, or choose another file"
        )


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if args.text_gen_type == "input-file":
        text = read_text_file(args.sample_input_file)  # non-UTF-8: named, with the offset
        # NeoX splits the file at prompt_end (a newline by default).
        prompts = [p.strip("\n") for p in text.split(args.prompt_end) if p.strip()]
        if not prompts:
            raise ValueError(f"sample_input_file {args.sample_input_file} holds no prompts")
        return prompts
    return [""] * args.num_samples  # unconditional


def run_one(
    streamer: Streamer, args: argparse.Namespace, prompt: str, seps: list[int], g: torch.Generator
) -> str:
    tok = streamer.tokenizer
    assert tok is not None
    ids = tok.tokenize(prompt) if prompt else []
    if not ids:  # unconditional: start from the end-of-document token
        ids = [tok.eod if tok.eod is not None else 0]
    cache = streamer.new_cache(policies(args, streamer.num_layers), seps, args.enable_pos_shift)

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    out = generate(streamer, cache, ids, args.sampling, args.chunk_size, show, g, tok.eod)
    print(flush=True)
    return tok.detokenize(out)


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    args = settings(sys.argv[1:] if argv is None else argv)
    streamer = load_model(args.model_name_or_path, read_options(args))
    if streamer.tokenizer is None:
        raise ValueError(f"{streamer.source} has no tokenizer")
    seps = (
        args.separator_token_ids
        if args.separator_token_ids is not None
        else streamer.default_separator_ids
    )
    check_separator_ids(seps, streamer.vocab_size)
    policies(args, streamer.num_layers)  # per-layer list lengths against the model
    streamer.model.to(torch.device(args.device))
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    results: list[dict[str, str]] = []
    if args.text_gen_type == "interactive" and args.prompt is None:
        for line in sys.stdin:
            if not line.strip():
                break
            results.append(
                {
                    "context": line.rstrip("\n"),
                    "text": run_one(streamer, args, line.rstrip("\n"), seps, g),
                }
            )
        _write(args, results)
        return results
    for prompt in args.prompt_list:
        results.append({"context": prompt, "text": run_one(streamer, args, prompt, seps, g)})
    _write(args, results)
    return results


def _write(args: argparse.Namespace, results: list[dict[str, str]]) -> None:
    if args.sample_output_file is not None:
        text = "".join(json.dumps(r) + "\n" for r in results)
        atomic_write_text(args.sample_output_file, text)
        print(f"generate.py: {len(results)} samples -> {args.sample_output_file}")


if __name__ == "__main__":
    pin_cpu_accelerator()  # DeepSpeed's CPU fallback without its "If you have GPU" warning
    try:
        main()
    except (ValueError, FileNotFoundError, ConfigError, *READ_ERRORS) as e:
        print(f"generate.py: {e}", file=sys.stderr)
        sys.exit(2)
