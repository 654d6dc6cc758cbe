"""Build the data of the local LAMBADA-style task (megatron/eval/tasks/shakespeare_lambada.*)
from the validation documents of the bundled Shakespeare corpus.

    python tools/eval/make_lambada_task.py [--split 949,50,1] [--out FILE] [--limit N]

The shipped jsonl was written by this command with its defaults; rerun it after changing
the corpus or the split (the passages must come from documents the models did not train on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.eval.lambada import DATA_FILE, DEFAULT_SPLIT, build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--split", default=DEFAULT_SPLIT, help="the training configs' split")
    p.add_argument("--out", type=Path, default=DATA_FILE)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    try:
        n = build(args.out, args.split, args.limit)
    except (ValueError, RuntimeError) as e:
        print(f"make_lambada_task.py: {e}", file=sys.stderr)
        return 2
    print(f"{n} passages -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
