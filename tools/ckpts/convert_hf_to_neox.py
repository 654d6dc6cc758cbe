"""Convert a transformers GPT-NeoX / Llama folder into a checkpoint of ours (docs/hf.md).

    python tools/ckpts/convert_hf_to_neox.py --input_dir hf/model --output_dir ckpts/model \
        [--model_parallel_size N] [--pipe_parallel_size P] [--skip_tokenizer]

Exact or refused before anything is written (megatron/hf/importer.py): every tensor the
architecture needs present with the shape and floating dtype config.json implies, none left
over, finite values, a tokenizer that loads (or --skip_tokenizer, which finetune.yml then
says). The output is a checkpoint as the trainer writes it, read as it is by
convert_neox_to_hf.py, generate.py, tools/streaming/evaluate_ppl.py and eval.py, plus
`<output_dir>/finetune.yml` to fine-tune it at the layout asked for:

    python deepy.py train.py <output_dir>/finetune.yml my_data.yml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron.common.accelerator import pin_cpu_accelerator
from megatron.hf.configs import UnmappedOption
from megatron.hf.folder import HFFolderRefused
from megatron.hf.importer import import_hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input_dir", required=True, help="a transformers model folder")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_parallel_size", type=int, default=1)
    p.add_argument("--pipe_parallel_size", type=int, default=1)
    p.add_argument("--seq_length", type=int, default=None, help="default: max_position_embeddings")
    p.add_argument("--skip_tokenizer", action="store_true", help="import the weights only")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    return import_hf(
        args.input_dir,
        args.output_dir,
        args.model_parallel_size,
        args.pipe_parallel_size,
        args.seq_length,
        args.skip_tokenizer,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = convert(args)
    except (UnmappedOption, HFFolderRefused, FileExistsError, KeyError) as e:
        print(f"convert_hf_to_neox: refused: {e}", file=sys.stderr)
        return 2
    print(f"{args.input_dir} -> {out} (fine-tune with {out / 'finetune.yml'})")
    return 0


if __name__ == "__main__":
    pin_cpu_accelerator()  # DeepSpeed's CPU fallback without its "If you have GPU" warning
    sys.exit(main())
