"""Convert a checkpoint of our trainer into a transformers folder (docs/hf.md).

    python tools/ckpts/convert_neox_to_hf.py --input_dir checkpoints/tiny \
        --output_dir hf/tiny [--architecture neox|llama] [--precision fp32|bf16|fp16]

`--input_dir` is a save directory (its `latest` is used) or one `global_stepN`, of any
TP x PP x ZeRO layout, or the output of convert_hf_to_neox.py. The checkpoint is verified
(COMPLETE, checksums) and read weights-only; every check (mappable architecture, castable
precision, a tokenizer of the model's vocabulary, represented exactly) runs before the output
directory appears (megatron/hf/export.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron.checkpoint import READ_ERRORS, add_read_args, read_options
from megatron.common.accelerator import pin_cpu_accelerator
from megatron.hf.configs import UnmappedOption
from megatron.hf.export import PrecisionRefused, export_checkpoint
from megatron.hf.tokenizer import TokenizerRefused

REFUSALS = (*READ_ERRORS, UnmappedOption, PrecisionRefused, TokenizerRefused)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input_dir", required=True, help="save dir (uses latest) or global_stepN")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--architecture", choices=["neox", "llama"], default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--vocab_file", default=None, help="tokenizer file, if it moved since training")
    p.add_argument("--merge_file", default=None)
    p.add_argument("--skip_tokenizer", action="store_true", help="write weights and configs only")
    add_read_args(p)
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    return export_checkpoint(
        args.input_dir,
        args.output_dir,
        args.architecture,
        args.precision,
        args.vocab_file,
        args.merge_file,
        args.skip_tokenizer,
        read_options(args),
    )


def main(argv: list[str] | None = None) -> int:
    try:
        convert(parse_args(argv))
    except (*REFUSALS, FileExistsError, FileNotFoundError) as e:
        print(f"convert_neox_to_hf: refused: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    pin_cpu_accelerator()  # DeepSpeed's CPU fallback without its "If you have GPU" warning
    sys.exit(main())
