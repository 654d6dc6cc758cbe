"""SepLLM training vs full attention through the real trainer: ms/iteration, peak memory, loss.

    python benchmarks/sepllm_training.py [--seq 2048 4096 8192] [--windows 64 256]
        [--iters 8] [--rounds 3] [--plot PATH] [--no-memory]

The same model (configs/tiny.yml: d=256, 4 layers, 4 heads, fp32; micro batch 1) is trained
on the bundled Shakespeare corpus with full attention and with SepLLM (configs/tiny_sepllm.yml:
a=4, its separator ids, local window w), built through `build_run` and stepped with the real
Trainer's `train_step` (DeepSpeed engine, loss masking, clipping, AdamW). Every trainer reads
the same batches from the same initial weights. Per sequence length, rounds alternate the
order of the runs so machine drift hits all of them; the median round is reported.

Columns:
  kernel    the kernel the layers ran (`select_kernel` for sepllm.attention_kernel)
  ms/iter   median over rounds of (round wall time / iterations)
  speed-up  median over rounds of full attention's round time / this run's (same round)
  cpu ms, cpu x   the same from the process's CPU time (time.process_time), which other
            jobs on a shared machine disturb less than wall time
  peak MB   peak RSS of a fresh process over 3 training steps minus its RSS before them
            (VmHWM - VmRSS from /proc; '-' with --no-memory)
  kept      kept pairs / causal pairs and kept keys of the last query / S (kept-KV), measured
            from the kept sets of the timed batches
  loss      the first --loss-steps losses of this run against the same steps trained with the
            dense-mask reference kernel (`attention_kernel: dense`): the largest relative
            difference, which must be within fp32 tolerance (LOSS_RTOL)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from megatron.config.loader import load_config
from megatron.data.bundled import prepare_bundled_data
from megatron.sepllm.info import build_kept_set
from megatron.sepllm.kernels import flex_available, select_kernel, triton_available
from megatron.sepllm.stats import kept_stats
from megatron.training.distributed import init_distributed
from megatron.training.host_memory import tune_host_allocator
from megatron.training.run import build_run
from megatron.training.trainer import Trainer

BASE = "configs/tiny.yml"
SEPLLM = "configs/tiny_sepllm.yml"
# Relative loss difference accepted as "equal to fp32 tolerance". The first step compares the
# forward pass; later steps also carry the gradient (through AdamW, whose first update is
# nearly sign(g), so a gradient entry within rounding of 0 may flip: a few 1e-6 at most).
LOSS_RTOL = 1e-5


@dataclass
class Run:
    seq: int
    window: int  # 0: full attention
    trainer: Trainer
    batches: Iterator[torch.Tensor]
    kernel: str
    times: list[float] = field(default_factory=list)  # seconds per iteration, one per round
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per iteration
    losses: list[float] = field(default_factory=list)  # every step's loss, in order
    ref_losses: list[float] = field(default_factory=list)  # the dense reference's first steps
    kept_pairs: float = float("nan")
    kept_kv: float = float("nan")
    ref_diff: float = float("nan")  # largest relative loss difference vs the dense reference
    peak_mb: float = float("nan")

    @property
    def label(self) -> str:
        return "full" if self.window == 0 else f"w{self.window}"


def make_trainer(seq: int, window: int, kernel: str) -> Trainer:
    """Trainer of the tiny model at `seq`: full attention (window 0) or SepLLM."""
    paths = [BASE] if window == 0 else [BASE, SEPLLM]
    overrides: dict[str, object] = {
        "seq_length": seq,
        "max_position_embeddings": seq,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_iters": 100_000,
        "save": None,
        "load": None,
        "eval_interval": 0,
        "use_wandb": False,
    }
    if window:
        overrides |= {"local_window": window, "attention_kernel": kernel, "print_kv_ratio": False}
    cfg = load_config(paths, overrides=overrides)
    prepare_bundled_data(cfg)
    rank, world, device = init_distributed(cfg.launcher)
    return build_run(cfg, rank, world, device).trainer


def kernel_name(trainer: Trainer) -> str:
    """The kernel the trainer's layers run (select_kernel on the layer's parameters)."""
    cfg = trainer.cfg
    if cfg.sepllm.mode == "full":
        return "causal"
    seq = cfg.model.seq_length
    return select_kernel(
        cfg.sepllm.attention_kernel,
        device_type=trainer.device.type,
        q_len=seq,
        kv_len=seq,
        window=cfg.sepllm.local_window,
        head_dim=cfg.model.head_dim,
        dropout_p=0.0,
        flex_available=flex_available(),
        triton_available=triton_available(trainer.device.type),
        mode=cfg.sepllm.mode,
    )


def new_run(seq: int, window: int, kernel: str) -> Run:
    trainer = make_trainer(seq, window, kernel)
    batches = trainer._batches(trainer.data.train, 0)
    return Run(seq, window, trainer, batches, kernel_name(trainer))


def train(run: Run, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per iteration over `steps` optimizer steps."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss, _ = run.trainer.steps.train_step(run.batches)
        run.losses.append(loss)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def measure_kept(run: Run, n_batches: int) -> None:
    """Kept fractions over the first `n_batches` batches (those of the warm-up and rounds)."""
    cfg, seq = run.trainer.cfg, run.seq
    it = run.trainer._batches(run.trainer.data.train, 0)
    pairs, kv = [], []
    for _ in range(n_batches):
        kept = build_kept_set(next(it)[:, :-1], cfg.sepllm)
        stats = kept_stats(kept, [run.window], seq)
        pairs.append(stats[f"density/w{run.window}"])
        kv.append(stats[f"kv_ratio/w{run.window}"])
    run.kept_pairs, run.kept_kv = statistics.mean(pairs), statistics.mean(kv)


def reference_diff(run: Run, steps: int) -> float:
    """Largest relative difference of the run's first losses vs the dense-mask kernel's."""
    ref = new_run(run.seq, run.window, "dense")
    train(ref, steps)
    got, run.ref_losses = run.losses[:steps], ref.losses
    return max(abs(a - b) / abs(b) for a, b in zip(got, run.ref_losses, strict=True))


def bench_seq(seq: int, args: argparse.Namespace) -> list[Run]:
    runs = [new_run(seq, 0, "causal")]
    runs += [new_run(seq, w, args.kernel) for w in args.windows if w < seq]
    for run in runs:  # warm-up: allocations, per-batch plans; the losses of these steps
        train(run, args.loss_steps)
    for r in range(args.rounds):  # rotate the order: drift hits every run alike
        for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
            wall, cpu = train(run, args.iters)
            run.times.append(wall)
            run.cpu_times.append(cpu)
        times = ", ".join(f"{run.label} {1e3 * run.times[-1]:.0f}" for run in runs)
        print(f"  seq {seq} round {r + 1}/{args.rounds} ms/iter: {times}", flush=True)
    if args.profile:
        for run in runs:
            profile_step(run)
    n_batches = args.loss_steps + args.rounds * args.iters + (1 if args.profile else 0)
    for run in runs[1:]:
        measure_kept(run, n_batches)
        run.ref_diff = reference_diff(run, args.loss_steps)
    if not args.no_memory:
        for run in runs:
            run.peak_mb = probe_memory(seq, run.window, args.kernel)
    return runs


# Profiler events of the attention kernels: the compact kernel's autograd Function (its
# totals include the fused ops it calls), else the CPU flash op itself (causal SDPA).
COMPACT_EVENTS = ("_CompactAttention", "_CompactAttentionBackward")
FLASH_EVENTS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


def profile_step(run: Run) -> None:
    """--profile: one more training step under torch.profiler; prints the attention kernel's
    share of the step and the top operators by own time."""
    from torch.profiler import profile

    with profile() as prof:
        train(run, 1)
    events = {e.key: e for e in prof.key_averages()}
    if any(k in events for k in COMPACT_EVENTS):
        attn_us = sum(events[k].cpu_time_total for k in COMPACT_EVENTS if k in events)
    else:
        attn_us = sum(events[k].self_cpu_time_total for k in FLASH_EVENTS if k in events)
    step_us = sum(e.self_cpu_time_total for e in events.values())
    print(
        f"  profile seq {run.seq} {run.label}: step {step_us / 1e3:.0f} ms (profiled), "
        f"attention kernel {attn_us / 1e3:.0f} ms = {attn_us / step_us:.0%}",
        flush=True,
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), flush=True)


def probe_memory(seq: int, window: int, kernel: str) -> float:
    """Step peak RSS (MB) of this configuration, in a fresh process (see --probe)."""
    cmd = [sys.executable, __file__, "--probe", "--seq", str(seq), "--windows", str(window)]
    # A process group of its own: not this process's rendezvous variables (port in use).
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    proc = subprocess.run(
        [*cmd, "--kernel", kernel], capture_output=True, text=True, timeout=3600, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE_MB "):
            return float(line.split()[1])
    print(f"  memory probe failed: {proc.stderr[-2000:]}", file=sys.stderr)
    return float("nan")


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def probe(seq: int, window: int, kernel: str) -> None:
    """--probe: 3 training steps in this fresh process; prints PROBE_MB <peak - before>."""
    run = new_run(seq, window, kernel)
    before = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    train(run, 3)
    print(f"PROBE_MB {(_proc_status_kb('VmHWM') - before) / 1024:.1f}")


HEADER = (
    f"{'seq':>6} {'w':>5} {'kernel':>8} {'ms/iter':>9} {'speed-up':>8} {'cpu ms':>8} "
    f"{'cpu x':>6} {'peak MB':>8} {'kept':>6} {'kept-KV':>7} {'loss':>8} {'dense ref':>9} "
    f"{'rel diff':>9}"
)


def _speedup(full: list[float], run: list[float]) -> float:
    """Median over rounds of full / run: each round's pair ran minutes apart at most, so the
    ratio is steadier than the ratio of medians when the machine's load drifts."""
    return statistics.median(f / r for f, r in zip(full, run, strict=True))


def print_rows(runs: list[Run]) -> bool:
    """Prints one table row per run; True when every SepLLM run matched its dense reference."""
    ok = True
    full = {run.seq: run for run in runs if run.window == 0}
    for run in runs:
        ms, cpu = 1e3 * statistics.median(run.times), 1e3 * statistics.median(run.cpu_times)
        base = full[run.seq]
        speed = _speedup(base.times, run.times)
        cpu_speed = _speedup(base.cpu_times, run.cpu_times)
        w = "full" if run.window == 0 else str(run.window)
        if run.window:
            ok &= run.ref_diff <= LOSS_RTOL
            ref = f"{run.losses[0]:>8.4f} {run.ref_losses[0]:>9.4f} {run.ref_diff:>9.1e}"
            kept = f"{run.kept_pairs:>6.3f} {run.kept_kv:>7.3f}"
        else:
            ref, kept = f"{run.losses[0]:>8.4f} {'-':>9} {'-':>9}", f"{'1.000':>6} {'1.000':>7}"
        print(
            f"{run.seq:>6} {w:>5} {run.kernel:>8} {ms:>9.1f} {speed:>7.2f}x {cpu:>8.1f} "
            f"{cpu_speed:>5.2f}x {run.peak_mb:>8.1f} {kept} {ref}",
            flush=True,
        )
    return ok


def plot(runs: list[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = {r.seq: r.times for r in runs if r.window == 0}
    fig, ax = plt.subplots(figsize=(6, 4))
    for w in sorted({r.window for r in runs if r.window}):
        pts = [(r.seq, _speedup(full[r.seq], r.times)) for r in runs if r.window == w]
        ax.plot(*zip(*pts, strict=True), marker="o", label=f"SepLLM w={w}")
    ax.axhline(1.0, color="grey", linestyle="--", label="full attention")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speed-up vs full attention (ms/iter)")
    ax.set_title("SepLLM training speed-up, tiny model (d=256, 4 layers)")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--windows", type=int, nargs="+", default=[64, 256])
    p.add_argument("--iters", type=int, default=8, help="training iterations per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loss-steps", type=int, default=2, help="warm-up steps, compared to dense")
    p.add_argument("--kernel", default="auto", help="sepllm.attention_kernel of the SepLLM runs")
    p.add_argument("--plot", default="/tmp/sepllm_training_speedup.png", help="PNG path")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument(
        "--profile", action="store_true", help="profile one more step of each run (op table)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the trainer's own)"
    )
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.probe:
        probe(args.seq[0], args.windows[0], args.kernel)
        return
    tuned = tune_host_allocator()  # as train.py does (megatron/training/main.py)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before init_distributed reads it
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, allocator {tuned}")
    runs: list[Run] = []
    for seq in args.seq:  # rows as each length finishes (a long run shows progress)
        runs += bench_seq(seq, args)
        print(HEADER)
        print_rows([r for r in runs if r.seq == seq])
    print("\n" + HEADER)
    ok = print_rows(runs)
    print(f"losses equal to the dense-mask reference (rel <= {LOSS_RTOL:g}): {ok}")
    plot(runs, args.plot)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
