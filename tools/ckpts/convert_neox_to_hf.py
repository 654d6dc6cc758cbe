"""Convert a checkpoint of our trainer into a transformers folder (docs/hf.md).

    python tools/ckpts/convert_neox_to_hf.py --input_dir checkpoints/tiny \
        --output_dir hf/tiny [--architecture neox|llama] [--precision fp32|bf16|fp16]

`--input_dir` is a save directory (its `latest` is used) or one `global_stepN`. Every check
(complete checkpoint, mappable architecture, castable precision, representable tokenizer)
runs before the output directory appears; it is written under a temporary name and renamed
into place, so a failure leaves nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atomic_dir import atomic_dir, refuse_existing
from hf_tokenizer import TokenizerRefused, write_tokenizer
from neox_checkpoint import CheckpointRefused, read_checkpoint

from megatron.config.schema import Config
from megatron.hf.configs import UnmappedOption, check_exportable, family
from megatron.hf.export import PrecisionRefused, cast_state, write_hf_folder

REFUSALS = (CheckpointRefused, UnmappedOption, PrecisionRefused, TokenizerRefused)
TRAINING_PRECISION = {"fp32": "fp32", "bfloat16": "bf16", "fp16": "fp16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input_dir", required=True, help="save dir (uses latest) or global_stepN")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--architecture", choices=["neox", "llama"], default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--vocab_file", default=None, help="tokenizer file, if it moved since training")
    p.add_argument("--merge_file", default=None)
    p.add_argument("--skip_tokenizer", action="store_true", help="write weights and configs only")
    return p.parse_args(argv)


def _check_architecture(cfg: Config, args: argparse.Namespace) -> None:
    m = cfg.model
    check_exportable(m)
    if args.architecture and args.architecture != family(m):
        raise UnmappedOption(
            f"--architecture {args.architecture}: the checkpoint's model is {family(m)} style "
            f"(norm {m.norm}, activation {m.activation}); converting would change its logits"
        )


def convert(args: argparse.Namespace) -> Path:
    out = Path(args.output_dir)
    refuse_existing(out)
    ckpt = read_checkpoint(args.input_dir, lambda cfg: _check_architecture(cfg, args))
    m, data = ckpt.cfg.model, ckpt.cfg.data
    precision = args.precision or TRAINING_PRECISION[ckpt.cfg.training.precision]
    cast_state(ckpt.state, precision)  # refuses before the output directory exists
    data.vocab_file = args.vocab_file or data.vocab_file
    data.merge_file = args.merge_file or data.merge_file
    with atomic_dir(out) as tmp:
        ids: dict[str, int | None] = {}
        if not args.skip_tokenizer:
            ids = write_tokenizer(data, tmp)
        write_hf_folder(tmp, ckpt.state, m, ckpt.cfg.sepllm, precision, ids)
    print(f"{ckpt.step_dir} ({ckpt.source}) -> {out} [{family(m)}, {precision}]")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except (*REFUSALS, FileExistsError, FileNotFoundError) as e:
        print(f"convert_neox_to_hf: refused: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
