"""The long-range recall benchmark (docs/results.md, "Long-range recall"): does information
flow through separators? Trains vanilla, StreamingLLM(w), SepLLM(w) and SepLLM(w) on data
without separators (configs/experiments/recall_*.yml) on megatron/data/recall.py's task, then
measures query accuracy by distance on held-out sequences and through the streaming caches.

    OMP_NUM_THREADS=1 python tools/experiments/run_recall.py --out runs/recall
    python tools/experiments/run_recall.py --out /tmp/recall_smoke --smoke   # a 1-minute check

Stages (`--stages`, default all, in this order):
  data     <out>/data/{sep,nosep}_{train,valid}.bin/.idx: the same sequences (same seeds),
           segments closed by SEP or by the non-separator CLOSE (ablation).
  train    `python deepy.py train.py configs/experiments/recall_base.yml recall_<variant>.yml`
           per variant into <out>/ckpt/<variant> (checkpoints every 200 steps, all kept); a
           finished run is skipped, a partial one resumes.
  measure  per variant and saved step: query accuracy and loss on held-out sequences
           (a seed never trained on), by distance; <out>/results/<variant>.json.
  stream   long held-out streams (STREAM_FACTOR x seq_length) through SepCache and the sink
           cache at equal budget; accuracy by distance and by whether the fact's separator is
           held; <out>/results/stream.json.
  report   <out>/recall.md (tables) and <out>/plots/*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from run_study import Clock, cached_json, eta, finished, log, run_logged, run_stages  # noqa: E402

from megatron.common.files import atomic_write_text  # noqa: E402
from megatron.data.recall import RecallSpec, write_dataset  # noqa: E402

CONFIG_DIR = ROOT / "configs" / "experiments"
BASE = "recall_base.yml"
VARIANTS = ("vanilla", "streamingllm_w", "sepllm_w", "sepllm_w_nosep")
STAGES = ("data", "train", "measure", "stream", "report")
SEEDS = {"train": 1, "valid": 2}  # held-out evaluation uses seed 3 (recall_measure.HELDOUT_SEED)

# The smoke run: same configs, a model and data small enough for CI (seconds per stage).
SMOKE_SET = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "train_micro_batch_size_per_gpu": 2,
    "train_iters": 4,
    "log_interval": 1,
    "eval_interval": 4,
    "eval_iters": 1,
    "checkpoint_factor": 2,
}


def base_value(key: str, args: argparse.Namespace) -> Any:
    """A training setting as the runs see it: --set, then the smoke overrides, then the base."""
    for kv in reversed(args.set):
        if kv.split("=", 1)[0].replace("-", "_") == key:
            import yaml

            return yaml.safe_load(kv.split("=", 1)[1])
    if args.smoke and key in SMOKE_SET:
        return SMOKE_SET[key]
    import yaml

    return yaml.safe_load((CONFIG_DIR / BASE).read_text())[key]


def data_prefix(data: Path, variant: str, split: str) -> Path:
    return data / f"{'nosep' if variant.endswith('_nosep') else 'sep'}_{split}"


def stage_data(args: argparse.Namespace, clock: Clock) -> None:
    seq = int(base_value("seq_length", args))
    iters = int(base_value("train_iters", args))
    batch = int(base_value("train_micro_batch_size_per_gpu", args))
    counts = {"train": iters * batch + 1, "valid": 16 * batch}
    for kind, separators in (("sep", True), ("nosep", False)):
        for split, n in counts.items():
            prefix = args.data / f"{kind}_{split}"
            if Path(f"{prefix}.idx").is_file():
                log(f"data {prefix.name}: done already")
                continue
            t0 = time.perf_counter()
            spec = RecallSpec(separators=separators)
            q = write_dataset(str(prefix), spec, n, seq, SEEDS[split])
            clock.record(f"data/{prefix.name}", time.perf_counter() - t0)
            log(f"data {prefix.name}: {n} sequences of {seq} tokens, {q} queries")


def train_command(args: argparse.Namespace, name: str) -> list[str]:
    save = args.out / "ckpt" / name
    configs = [str(CONFIG_DIR / BASE), str(CONFIG_DIR / f"recall_{name}.yml")]
    sets: dict[str, Any] = {"save": save, "load": save, "metrics_jsonl": save / "metrics.jsonl"}
    sets["train_data_paths"] = f"[{data_prefix(args.data, name, 'train')}]"
    sets["valid_data_paths"] = f"[{data_prefix(args.data, name, 'valid')}]"
    if args.smoke:
        sets.update(SMOKE_SET)
    sets.update(dict(kv.split("=", 1) for kv in args.set))
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    if args.launcher == "deepy":
        return [sys.executable, "deepy.py", "train.py", *configs, *flags]
    return [sys.executable, "train.py", *configs, *flags]


def stage_train(args: argparse.Namespace, clock: Clock) -> None:
    iters, start = int(base_value("train_iters", args)), time.perf_counter()
    for n, name in enumerate(args.variants):
        save = args.out / "ckpt" / name
        if finished(save, iters):
            log(f"train {name}: done already ({save})")
            continue
        log(f"train {name}: {iters} steps -> {save} (log {args.out / 'logs' / name}.train.log)")
        t0 = time.perf_counter()
        run_logged(train_command(args, name), args.out / "logs" / f"{name}.train.log", name)
        clock.record(f"train/{name}", time.perf_counter() - t0)
        log(
            f"train {name}: {time.perf_counter() - t0:.0f} s "
            f"({eta(n + 1, len(args.variants), start)})"
        )


def stage_measure(args: argparse.Namespace, clock: Clock) -> None:
    import recall_measure

    for name in args.variants:
        t0 = time.perf_counter()
        path = args.out / "results" / f"{name}.json"
        done = path.is_file() and not args.force
        spec = RecallSpec(separators=not name.endswith("_nosep"))
        cached_json(
            path,
            args.force,
            lambda n=name, s=spec: recall_measure.measure_run(args.out / "ckpt" / n, s, args.smoke),
        )
        if not done:
            clock.record(f"measure/{name}", time.perf_counter() - t0)
        log(f"measure {name}: {'done already' if done else f'{time.perf_counter() - t0:.1f} s'}")


def stage_stream(args: argparse.Namespace, clock: Clock) -> None:
    import recall_measure

    t0 = time.perf_counter()
    runs = {n: args.out / "ckpt" / n for n in args.variants if not n.endswith("_nosep")}
    cached_json(
        args.out / "results" / "stream.json",
        args.force,
        lambda: recall_measure.measure_streams(runs, args.smoke),
    )
    clock.record("stream", time.perf_counter() - t0)
    log(f"stream: {time.perf_counter() - t0:.1f} s")


def stage_report(args: argparse.Namespace, clock: Clock) -> None:
    import recall_report

    t0 = time.perf_counter()
    results = recall_report.collect(args.out, args.variants)
    results["meta"] = {"timings": clock.times, "set": args.set, "smoke": args.smoke}
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    pngs = recall_report.plot_all(args.out / "plots", results)
    atomic_write_text(args.out / "recall.md", recall_report.markdown(results, pngs))
    clock.record("report", time.perf_counter() - t0)
    log(f"report: {args.out / 'recall.md'}, {len(pngs)} plots in {args.out / 'plots'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="experiment directory (resumable)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data folder (default <out>/data; another run's "
        "data can be reused, e.g. for a longer run: --set train_iters=N repeats it in epochs)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 steps, short streams")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--launcher", choices=["deepy", "direct"], default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--force", action="store_true", help="recompute measurements and streams")
    args = p.parse_args(argv)
    args.launcher = args.launcher or ("direct" if args.smoke else "deepy")
    args.out = args.out.resolve()
    args.data = (args.data or args.out / "data").resolve()
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        p.error(f"--set expects KEY=VALUE, got {bad}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.out / "timings.json")
    stages = {
        "data": stage_data,
        "train": stage_train,
        "measure": stage_measure,
        "stream": stage_stream,
        "report": stage_report,
    }
    run_stages("recall", stages, args, clock)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"run_recall.py: {e}", file=sys.stderr)
        sys.exit(1)
