"""Long-range recall: the qualitative ordering of issue 24 as a printout, not a test.

    OMP_NUM_THREADS=1 python benchmarks/recall.py --out runs/recall      # about 30-40 min here
    python benchmarks/recall.py --out runs/recall --report_only          # print a finished run

Runs tools/experiments/run_recall.py (resumable: finished stages are skipped) and prints the
measured far-query accuracy (d > 4w) of each model against the expected ordering: vanilla
>= 0.9, SepLLM(w) >= 0.8, StreamingLLM(w) and SepLLM(w) on separator-free data near chance,
and, streaming, SepCache above the sink cache for the SepLLM(w) model. A "NOT met" line is a
measurement to report, not a failure: training at this scale is noisy (docs/results.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools" / "experiments")]

import recall_report  # noqa: E402
import run_recall  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="experiment directory")
    p.add_argument("--report_only", action="store_true", help="only print a finished run")
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds (checks the wiring)")
    args, rest = p.parse_known_args(argv)
    if not args.report_only:
        smoke = ["--smoke"] if args.smoke else []
        code = run_recall.main(["--out", str(args.out), *smoke, *rest])
        if code:
            return code
    results = recall_report.collect(args.out.resolve(), list(run_recall.VARIANTS))
    if not results["runs"]:
        print(f"recall.py: no results under {args.out}/results", file=sys.stderr)
        return 2
    print("\n".join(recall_report.heldout_table(results["runs"])))
    print("\nexpected ordering at d > 4w (issue 24):")
    for line in recall_report.target_lines(results):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
