"""The SepLLM study end to end (docs/results.md): train the five variants of
configs/experiments/, convert them to transformers, measure, plot, and write a report.

    OMP_NUM_THREADS=1 python tools/experiments/run_study.py --out runs/study   # docs/results.md
    python tools/experiments/run_study.py --out /tmp/smoke --smoke     # a 1-2 minute check

Stages (`--stages`, default all, in this order):
  train     `python deepy.py train.py configs/experiments/base.yml <variant>.yml` per variant,
            into <out>/ckpt/<variant>; a run whose final checkpoint is COMPLETE is skipped, a
            partial one resumes from its last checkpoint.
  convert   tools/ckpts/convert_neox_to_hf.py -> <out>/hf/<variant> (skipped when present).
  measure   per variant: validation perplexity at the training length (our checkpoint and
            its transformers twin), density / KV ratio / ms per iteration from the run's
            metrics.jsonl; training-free SepLLM / StreamingLLM attention on the vanilla model.
  stream    streaming perplexity over a held-out stream (>= 8x seq_length) with SepCache,
            sink and full caches at equal budget, with and without positional shift.
  lmeval    eval.py's LAMBADA-style task (shakespeare_lambada, 0-shot) on every run.
  report    results.json, results.md and the PNGs of tools/plots/study_plots.py.
Every result file is written atomically and is the stage's "done" marker, so an
interrupted study reruns only what is missing (`--force` redoes the measurements).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent), str(ROOT / "tools" / "plots")]

from megatron.checkpoint import READ_ERRORS, layout  # noqa: E402
from megatron.common.files import atomic_write_text  # noqa: E402

LMEVAL_TASK = "shakespeare_lambada"
CONFIG_DIR = ROOT / "configs" / "experiments"
BASE = "base.yml"
VARIANTS = ("vanilla", "streamingllm_w", "sepllm_w", "sepllm_2w", "sepllm_ht")
STAGES = ("train", "convert", "measure", "stream", "lmeval", "report")

# The smoke study: same configs, a model and stream small enough for CI (seconds per stage).
SMOKE_SET = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "seq_length": 128,
    "max_position_embeddings": 128,
    "train_micro_batch_size_per_gpu": 2,
    "train_iters": 4,
    "log_interval": 1,
    "eval_interval": 4,
    "eval_iters": 1,
    "checkpoint_factor": 4,
    "print_ratio_intervals": 1,
}


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """Seconds each stage (and each unit of work inside it) took, for the report."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, seconds: float) -> None:
        self.times[key] = round(seconds, 1)
        atomic_write_text(self.path, json.dumps(self.times, indent=1) + "\n")


def eta(done: int, total: int, start: float) -> str:
    """'3/5, 2 min elapsed, ETA 1.3 min' from the mean time of the finished items."""
    spent = time.perf_counter() - start
    left = spent / done * (total - done) if done else float("nan")
    return f"{done}/{total}, {spent / 60:.1f} min elapsed, ETA {left / 60:.1f} min"


# --------------------------------------------------------------------------- train


def run_dir(out: Path, name: str) -> Path:
    return out / "ckpt" / name


def train_iters(args: argparse.Namespace) -> int:
    for kv in reversed(args.set):
        if kv.split("=", 1)[0].replace("-", "_") == "train_iters":
            return int(kv.split("=", 1)[1])
    if args.smoke:
        return int(SMOKE_SET["train_iters"])
    import yaml

    return int(yaml.safe_load((CONFIG_DIR / BASE).read_text())["train_iters"])


def finished(save: Path, iters: int) -> bool:
    """Done = `latest` names global_step<train_iters> and that directory is COMPLETE."""
    latest = save / layout.LATEST
    if not latest.is_file():
        return False
    tag = latest.read_text().strip()
    return tag == layout.tag_for(iters) and (save / tag / layout.COMPLETE).is_file()


def train_command(args: argparse.Namespace, name: str) -> list[str]:
    save = run_dir(args.out, name)
    configs = [str(CONFIG_DIR / BASE), str(CONFIG_DIR / f"{name}.yml")]
    sets = {"save": save, "load": save, "metrics_jsonl": save / "metrics.jsonl"}
    if args.smoke:
        sets.update(SMOKE_SET)
    sets.update(dict(kv.split("=", 1) for kv in args.set))  # the same for every variant
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    if args.launcher == "deepy":
        return [sys.executable, "deepy.py", "train.py", *configs, *flags]
    return [sys.executable, "train.py", *configs, *flags]  # one process, no launcher


def run_logged(cmd: Sequence[str], log_path: Path, what: str) -> None:
    """Run `cmd` from the repo root, output to `log_path`; on failure show its tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(list(cmd), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{what} failed (exit {rc}); last lines of {log_path}:\n{tail}")


def stage_train(args: argparse.Namespace, clock: Clock) -> None:
    iters, start = train_iters(args), time.perf_counter()
    for n, name in enumerate(args.variants):
        save = run_dir(args.out, name)
        if finished(save, iters):
            log(f"train {name}: done already ({save})")
            continue
        log(f"train {name}: {iters} steps -> {save} (log {args.out / 'logs' / name}.train.log)")
        t0 = time.perf_counter()
        run_logged(train_command(args, name), args.out / "logs" / f"{name}.train.log", name)
        clock.record(f"train/{name}", time.perf_counter() - t0)
        took = time.perf_counter() - t0
        log(f"train {name}: {took:.0f} s ({eta(n + 1, len(args.variants), start)})")


# --------------------------------------------------------------------------- convert


def stage_convert(args: argparse.Namespace, clock: Clock) -> None:
    """What tools/ckpts/convert_neox_to_hf.py does, per run, in this process (one import of
    torch / transformers for all five instead of one per run)."""
    from megatron.hf.export import export_checkpoint

    for name in args.variants:
        dst = args.out / "hf" / name
        if (dst / "config.json").is_file():
            log(f"convert {name}: done already ({dst})")
            continue
        t0 = time.perf_counter()
        argv = ["--input_dir", str(run_dir(args.out, name)), "--output_dir", str(dst)]
        log(f"convert {name}: python tools/ckpts/convert_neox_to_hf.py {' '.join(argv)}")
        try:
            export_checkpoint(run_dir(args.out, name), dst, report=log)
        except (*READ_ERRORS, ValueError, OSError) as e:  # the refusals the CLI prints
            raise RuntimeError(f"converting {name}: refused: {e}") from e
        clock.record(f"convert/{name}", time.perf_counter() - t0)
        log(f"convert {name}: {time.perf_counter() - t0:.1f} s -> {dst}")


# --------------------------------------------------------------------------- measure / stream


def cached_json(path: Path, force: bool, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The result at `path`, computed by `make` (and written atomically) when missing."""
    if path.is_file() and not force:
        return json.loads(path.read_text())
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")
    return value


def stage_measure(args: argparse.Namespace, clock: Clock) -> None:
    import measure  # torch + the model: imported only for the stages that need them

    for name in args.variants:
        t0 = time.perf_counter()
        path = args.out / "results" / f"{name}.json"
        done = path.is_file() and not args.force
        cached_json(
            path,
            args.force,
            lambda n=name: measure.measure_run(args.out, n, run_dir(args.out, n), args.smoke),
        )
        if not done:
            clock.record(f"measure/{name}", time.perf_counter() - t0)
        log(f"measure {name}: {'done already' if done else f'{time.perf_counter() - t0:.1f} s'}")
    if "vanilla" in args.variants:
        t0 = time.perf_counter()
        path = args.out / "results" / "training_free.json"
        cached_json(
            path,
            args.force,
            lambda: measure.training_free(run_dir(args.out, "vanilla"), args.out, args.smoke),
        )
        clock.record("measure/training_free", time.perf_counter() - t0)
        log(f"measure training-free: {time.perf_counter() - t0:.1f} s")


def stage_stream(args: argparse.Namespace, clock: Clock) -> None:
    import measure

    jobs = [j for j in measure.stream_jobs(args.smoke) if j.model in args.variants]
    stream = measure.heldout_stream(run_dir(args.out, jobs[0].model), args.smoke)
    log(f"stream: {len(jobs)} runs over {len(stream) - 1} held-out tokens")
    start = time.perf_counter()
    for n, job in enumerate(jobs):
        path = args.out / "streaming" / job.key / "result.json"
        if path.is_file() and not args.force:
            log(f"stream {job.key}: done already")
            continue
        t0 = time.perf_counter()
        s = measure.run_stream(job, run_dir(args.out, job.model), stream, path.parent)
        clock.record(f"stream/{job.key}", time.perf_counter() - t0)
        log(
            f"stream {job.key}: ppl {s['ppl']:.2f}, mean cache {s['mean_cache_length']:.0f}, "
            f"{s['tokens_per_s']:.0f} tok/s ({eta(n + 1, len(jobs), start)})"
        )


def stage_lmeval(args: argparse.Namespace, clock: Clock) -> None:
    """eval.py's local LAMBADA-style task (0-shot) on every run: python eval.py
    --model_name_or_path <ckpt> --tasks shakespeare_lambada, here in one process."""
    from megatron.eval.harness import evaluate

    for name in args.variants:
        path = args.out / "results" / f"{name}.lmeval.json"
        if path.is_file() and not args.force:
            log(f"lmeval {name}: done already")
            continue
        t0 = time.perf_counter()
        limit = 8 if args.smoke else None
        res = evaluate(
            "sepneox",
            {"path": str(run_dir(args.out, name))},
            [LMEVAL_TASK],
            num_fewshot=0,
            limit=limit,
            bootstrap_iters=1000,
        )
        cached_json(path, True, lambda r=res: {"results": r["results"], "n": r["n-samples"]})
        clock.record(f"lmeval/{name}", time.perf_counter() - t0)
        r = res["results"][LMEVAL_TASK]
        log(
            f"lmeval {name}: acc {r['acc,none']:.3f} ppl {r['perplexity,none']:.1f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )


def stage_report(args: argparse.Namespace, clock: Clock) -> None:
    import report

    t0 = time.perf_counter()
    results = report.collect(args.out, args.variants)
    results["meta"] = report.meta(args, clock.times)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1) + "\n")
    import study_plots

    pngs = study_plots.plot_all(args.out, results, args.benchmark)
    atomic_write_text(args.out / "results.md", report.markdown(results, pngs))
    clock.record("report", time.perf_counter() - t0)
    log(f"report: {args.out / 'results.md'}, {len(pngs)} plots in {args.out / 'plots'}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="study directory (resumable)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 steps, short streams")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument(
        "--launcher",
        choices=["deepy", "direct"],
        default=None,
        help="deepy: python deepy.py train.py (default); direct: python train.py (smoke default)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every variant's training (deepy.py --set), e.g. train_iters=320",
    )
    p.add_argument("--force", action="store_true", help="recompute measurements and streams")
    p.add_argument(
        "--benchmark",
        type=Path,
        default=None,
        help="speed-up table for speedup.png: sepllm_training.py output (.txt), JSON or CSV",
    )
    args = p.parse_args(argv)
    args.launcher = args.launcher or ("direct" if args.smoke else "deepy")
    args.out = args.out.resolve()
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Bad input fails here, before any training starts."""
    missing = [
        str(CONFIG_DIR / f)
        for f in (BASE, *(f"{v}.yml" for v in args.variants))
        if not (CONFIG_DIR / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"missing study configs: {', '.join(missing)}")
    if args.benchmark is not None and not args.benchmark.is_file():
        raise FileNotFoundError(f"--benchmark {args.benchmark} does not exist")
    if "vanilla" not in args.variants and {"measure", "stream"} & set(args.stages):
        log("note: without vanilla there is no training-free case")
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        raise ValueError(f"--set expects KEY=VALUE, got {bad}")
    if args.out.exists() and not args.out.is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_inputs(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"run_study.py: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.out / "timings.json")
    stages = {
        "train": stage_train,
        "convert": stage_convert,
        "measure": stage_measure,
        "stream": stage_stream,
        "lmeval": stage_lmeval,
        "report": stage_report,
    }
    run_stages("study", stages, args, clock)
    return 0


Stage = Callable[[argparse.Namespace, "Clock"], None]


def run_stages(what: str, stages: dict[str, Stage], args: argparse.Namespace, clock: Clock) -> None:
    """Run the stages args.stages names, in `stages`' order, logging each one's time."""
    kind = "smoke" if args.smoke else "full"
    log(f"{what} -> {args.out} ({kind}; stages {' '.join(args.stages)})")
    for name, stage in stages.items():
        if name in args.stages:
            t0 = time.perf_counter()
            stage(args, clock)
            log(f"stage {name}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"run_study.py: {e}", file=sys.stderr)
        sys.exit(1)
