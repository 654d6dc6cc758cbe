"""The training loop: micro steps through the DeepSpeed engine, eval, logging, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.checkpoint.writer import ANY_LAYOUT
from megatron.config.loader import config_to_dict
from megatron.config.schema import Config
from megatron.parallel.topology import Parallelism
from megatron.sepllm.info import build_kept_set
from megatron.sepllm.stats import SeparatorWatch, kept_stats
from megatron.training import checkpoint, preflight, universal
from megatron.training.batches import make_loader
from megatron.training.metrics import MetricsWriter, format_line
from megatron.training.schedule import apply_config_hyperparameters
from megatron.training.setup import Datasets
from megatron.training.steps import build_steps

log = logging.getLogger("megatron")


class Trainer:
    def __init__(
        self,
        cfg: Config,
        data: Datasets,
        rank: int,
        device: torch.device,
        eod: int | None,
        raw_configs: dict[str, str],
        par: Parallelism,
    ) -> None:
        self.cfg, self.data, self.rank, self.device, self.eod = cfg, data, rank, device, eod
        self.raw_configs, self.par = raw_configs, par
        self.steps = build_steps(cfg, par, eod)
        self.engine, self.scheduler = self.steps.engine, self.steps.scheduler
        self.iteration = self.consumed_samples = self.n_evals = self.skipped_steps = 0
        self.skip_budget = SkipBudget()
        # What the run reads, saved with each checkpoint (a resume warns when it changed).
        self.data_files = preflight.data_fingerprints(cfg) if rank == 0 else {}
        self.resumed_from: Path | None = None  # the checkpoint this run started from
        if cfg.checkpoint.load:
            self._load()
        self.saved_iteration = self.iteration  # a resumed step is on disk already
        self.metrics = MetricsWriter(cfg.logging, rank, config_to_dict(cfg), cfg.checkpoint.save)
        self.losses: list[float] = []  # per optimizer step, on every rank (DP-averaged)
        self.last_valid_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.separator_watch = SeparatorWatch(cfg.sepllm, report=rank == 0)

    def _load(self) -> None:
        ck, par = self.cfg.checkpoint, self.par
        tag = checkpoint.resolve_tag(ck)
        if tag is None:
            return
        path = self.resumed_from = Path(ck.load) / tag
        saved = universal.saved_layout(path)
        current = (self.cfg.parallel.model_parallel_size, par.pp_size)
        if saved is None or saved == current:
            iteration = checkpoint.load(self.engine, ck, tag)
        else:
            # Another TP/PP layout: reshard from the layout-independent copy. Per-rank RNG
            # streams do not map between layouts; data order is unaffected (by sample index).
            universal.load(path, self.engine, self.cfg, par, ck.finetune)
            iteration = 0 if ck.finetune else universal.saved_iteration(path)
            universal.restore_counters(self.engine, self.scheduler, iteration)
        self.iteration = iteration
        if iteration:  # not a finetune: continue the saved counters
            state = _trainer_state(path)
            g = self.cfg.derived.global_batch
            # consumed_samples, not iteration x batch: a changed batch size resumes at the
            # next unseen sample. Checkpoints older than the state file fall back to both.
            self.consumed_samples = int(state.get("consumed_samples", iteration * g))
            self.n_evals = int(state.get("n_evals", self._evals_before(iteration)))
            self.skipped_steps = int(state.get("skipped_steps", 0))
            if self.cfg.schedule.override_lr_scheduler:  # preflight refuses changes otherwise
                c = self.cfg
                lr = apply_config_hyperparameters(
                    self.scheduler, c.optimizer, c.schedule, c.training.train_iters
                )
                if self.rank == 0:
                    log.info(
                        "override_lr_scheduler: this config's lr schedule, betas and "
                        "weight decay apply from here on (next lr %.3g)",
                        lr,
                    )
        if self.rank == 0:
            # An imported checkpoint's full copy fits any layout (saved as ANY_LAYOUT).
            moved = saved not in (None, current) and ANY_LAYOUT not in saved
            how = f" (resharded from TP x PP = {saved})" if moved else ""
            log.info(
                "resumed from %s at iteration %d, sample %d, evaluation %d%s",
                path,
                iteration,
                self.consumed_samples,
                self.n_evals,
                how,
            )

    def _evals_before(self, iteration: int) -> int:
        every = self.cfg.logging.eval_interval
        return iteration // every if every and self.data.valid is not None else 0

    def _batches(self, dataset: Any, consumed: int) -> Iterator[torch.Tensor]:
        d = self.cfg.derived
        loader = make_loader(
            dataset,
            consumed,
            d.micro_batch,
            self.par.dp_size,
            self.par.dp_rank,  # tensor / pipeline peers read the same samples
            self.cfg.data.num_workers,
        )
        for tokens in loader:
            self.separator_watch.check(tokens)
            yield tokens.to(self.device, non_blocking=True)

    def run(self) -> list[float]:
        cfg, d = self.cfg, self.cfg.derived
        stop = cfg.training.train_iters
        if cfg.training.exit_interval:
            stop = min(stop, cfg.training.exit_interval)
        self._check_train_samples(stop)
        batches = self._batches(self.data.train, self.consumed_samples)
        tokens_per_step = d.global_batch * cfg.model.seq_length
        run_start = window_start = time.perf_counter()
        window_losses: list[float] = []
        start_iter, window_steps = self.iteration, 0
        if self.iteration == 0 and 0 in cfg.checkpoint.extra_save_iters and cfg.checkpoint.save:
            self.save()  # the initial weights (NeoX's extra_save_iters: [0, ...])
        while self.iteration < stop:
            lr = self.scheduler.get_last_lr()[0]
            loss, grad_norm = self.steps.train_step(batches)
            loss = _dp_mean(loss, self.device)
            self.iteration += 1
            self.consumed_samples += d.global_batch
            self.losses.append(loss)
            window_steps += 1
            if not self._nonfinite_step(loss, grad_norm):
                window_losses.append(loss)
            self.metrics.scalars({"train/step_loss": loss}, self.iteration)
            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == start_iter + 1:
                now = time.perf_counter()
                per_iter = (now - window_start) / window_steps
                values = {
                    "train/loss": _mean(window_losses),
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens_per_step / per_iter,
                    "train/ms_per_iter": per_iter * 1000,
                }
                if cfg.training.skip_nonfinite_steps:
                    values["train/skipped_steps"] = self.skipped_steps
                self._log(values, per_iter * (cfg.training.train_iters - self.iteration))
                window_start, window_losses, window_steps = now, [], 0
            self._maybe_eval()
            self._maybe_save()
        check_replicas(self.engine.module, self.rank, self.par.dp_group)
        self.metrics.close()
        if self.rank == 0:
            steps = self.iteration - start_iter
            log.info(self._summary(steps, tokens_per_step, time.perf_counter() - run_start))
        return self.losses

    def _nonfinite_step(self, loss: float, grad_norm: float | None) -> bool:
        """The one non-finite guard, run at every step: True when this step was skipped
        (skip_nonfinite_steps), else raise so the run stops before the next save or prune.
        Loss and grad norm are the same on every rank (DP-mean; reduced gradients), so every
        rank takes the same decision."""
        bad = [
            f"{name} {value}"
            for name, value in (("loss", loss), ("grad norm", grad_norm))
            if value is not None and not math.isfinite(value)
        ]
        skipped = bool(getattr(self.steps, "skipped", False))
        if not bad and not skipped:
            self.skip_budget.record(False)
            return False
        # A skipped step with finite numbers: a norm past what fp32 clipping can represent.
        what = " and ".join(bad) or f"grad norm {grad_norm:.3g} (inf in fp32)"
        last = f"last checkpoint: {self.last_checkpoint or 'none this run'}"
        if skipped:
            self.skipped_steps += 1
            if self.rank == 0:
                log.warning(
                    "iteration %d: non-finite %s: step skipped, weights unchanged (%d skipped "
                    "so far)",
                    self.iteration,
                    what,
                    self.skipped_steps,
                )
            too_many = self.skip_budget.record(True)
            if too_many:
                raise NonFiniteError(
                    f"iteration {self.iteration}: {too_many}: the run is diverging, not "
                    f"meeting a rare bad batch; stopping ({last}). Lower lr or enable "
                    "gradient_clipping."
                )
            return True
        advice = (
            "Lower lr or enable gradient_clipping"
            if self.cfg.training.skip_nonfinite_steps
            else "Lower lr, enable gradient_clipping, or set skip_nonfinite_steps: true to skip "
            "such steps"
        )
        raise NonFiniteError(
            f"iteration {self.iteration}: non-finite {what}; stopping. Nothing of this step is "
            f"saved and no checkpoint is pruned ({last}). {advice}."
        )

    def _check_train_samples(self, stop: int) -> None:
        need = self.consumed_samples + (stop - self.iteration) * self.cfg.derived.global_batch
        if need > len(self.data.train):
            raise RuntimeError(
                f"the training split holds {len(self.data.train)} samples, but continuing at "
                f"sample {self.consumed_samples} for {stop - self.iteration} steps of "
                f"{self.cfg.derived.global_batch} needs {need}"
            )

    def _summary(self, steps: int, tokens_per_step: int, seconds: float) -> str:
        """The run's last line: what it reached, where it is saved, how long it took."""
        if steps == 0 and self.resumed_from is not None:  # a rerun of a finished run
            return (
                f"nothing to train: {self.resumed_from} is at iteration {self.iteration} "
                f"(train_iters {self.cfg.training.train_iters}); raise train_iters to continue"
            )
        last = self.last_checkpoint or self.resumed_from or "none"
        window = self.losses[-self.cfg.logging.log_interval :]
        train = f"{sum(window) / len(window):.4f}" if window else "n/a"
        valid = f"{self.last_valid_loss:.4f}" if self.last_valid_loss is not None else "n/a"
        rate = steps * tokens_per_step / seconds if seconds > 0 else 0.0
        h, rest = divmod(int(seconds), 3600)
        return (
            f"run finished at iteration {self.iteration} | train loss {train} (mean of the last "
            f"{len(window)} steps) | validation loss {valid} | last checkpoint "
            f"{last} | wall time {h}:{rest // 60:02d}:{rest % 60:02d} "
            f"for {steps} steps | {rate:,.0f} tokens/s"
        )

    def _log(self, values: dict[str, float], eta_s: float) -> None:
        self._sepllm_stats(values)
        if self.rank == 0:
            log.info(format_line(self.iteration, self.cfg.training.train_iters, values, eta_s))
        self.metrics.scalars(values, self.iteration)

    def _sepllm_stats(self, values: dict[str, float]) -> None:
        s = self.cfg.sepllm
        if s.mode == "full" or not s.print_kv_ratio:
            return
        if self.iteration % s.print_ratio_intervals and self.iteration != 1:
            return
        tokens = torch.from_numpy(self.data.train[self.iteration]["text"][None, :-1])
        stats = kept_stats(build_kept_set(tokens, s), self.cfg.derived.windows, tokens.shape[1])
        values.update({f"sepllm/{k}": v for k, v in stats.items()})
        if self.rank == 0:
            log.info("sepllm: %s", " ".join(f"{k} {v:.4f}" for k, v in stats.items()))

    def evaluate(self, dataset: Any, offset: int) -> float:
        self.engine.eval()
        batches = self._batches(dataset, offset)
        total, n = 0.0, self.cfg.logging.eval_iters
        with torch.no_grad():
            for _ in range(n):
                total += self.steps.eval_loss(batches)
        self.engine.train()
        return _dp_mean(total / n, self.device)

    def _maybe_eval(self) -> None:
        lg, it = self.cfg.logging, self.iteration
        last = it == self.cfg.training.train_iters
        if self.data.valid is None or not lg.eval_interval or (it % lg.eval_interval and not last):
            return
        # Each evaluation reads the next validation samples, wrapping when the split runs out;
        # n_evals is saved with checkpoints, so a resumed run evaluates the same samples.
        per_eval = lg.eval_iters * self.cfg.derived.global_batch
        slots = max(1, len(self.data.valid) // per_eval)
        offset = (self.n_evals % slots) * per_eval
        self.n_evals += 1
        loss = self.evaluate(self.data.valid, offset)
        if self.rank == 0:
            log.info(
                "validation at iter %d | loss %.4f | ppl %.2f", it, loss, math.exp(min(loss, 50))
            )
        self.metrics.scalars({"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50))}, it)
        self.last_valid_loss = loss

    def _maybe_save(self) -> None:
        ck, it = self.cfg.checkpoint, self.iteration
        last = it in (self.cfg.training.train_iters, self.cfg.training.exit_interval)
        extra = it in ck.extra_save_iters  # NeoX's extra_save_iters
        if not ck.save or (it % ck.checkpoint_factor and not last and not extra):
            return
        self.save()

    def save_at_stop(self) -> None:
        """A checkpoint of the last finished step, for a run stopped by a signal (every rank
        calls this; nothing happens when the step's checkpoint exists or saving is off)."""
        ck = self.cfg.checkpoint
        if ck.save and ck.save_on_stop and self.iteration > self.saved_iteration:
            if self.rank == 0:
                log.info("saving a checkpoint of iteration %d before stopping", self.iteration)
            self.save()

    def save(self) -> None:
        """Save this iteration's checkpoint (every rank calls this)."""
        ck, it = self.cfg.checkpoint, self.iteration
        self._check_finite_weights()
        client = {
            "iteration": it,
            "consumed_samples": self.consumed_samples,
            "n_evals": self.n_evals,
            "skipped_steps": self.skipped_steps,
            "run_shape": dataclasses.asdict(self.cfg.derived),  # preflight compares the vocab
            "data_files": self.data_files,
        }
        path = checkpoint.save(
            self.engine,
            ck,
            it,
            client,
            config_to_dict(self.cfg),
            self.raw_configs,
            extra=self._save_universal,
        )
        self.last_checkpoint, self.saved_iteration = path, it
        if self.rank == 0:
            log.info("saved checkpoint %s", path)

    def _save_universal(self, out: Path) -> None:
        universal.save(out, self.engine, self.cfg, self.par, self.iteration)

    def _check_finite_weights(self) -> None:
        """Belt and braces for the per-step guard: a checkpoint is never written from
        non-finite weights (one pass over this rank's parameters, at save time only)."""
        with torch.no_grad():
            ok = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1:
            raise NonFiniteError(
                f"iteration {self.iteration}: the weights hold NaN/inf; refusing to save a "
                f"checkpoint (last good one: {self.last_checkpoint or 'none this run'})"
            )


class NonFiniteError(RuntimeError):
    """A loss, grad norm or weight became NaN/inf: the run stops instead of saving it."""


# skip_nonfinite_steps is for rare bad batches: a run that keeps skipping is diverging.
MAX_CONSECUTIVE_SKIPS = 5
MAX_SKIPPED_FRACTION = 0.1  # of this run's steps, judged once it has taken SKIP_WINDOW steps
SKIP_WINDOW = 20


@dataclasses.dataclass
class SkipBudget:
    """Counts this run's skipped steps; `record` says why to stop once there are too many."""

    steps: int = 0
    skipped: int = 0
    streak: int = 0

    def record(self, skipped: bool) -> str | None:
        self.steps += 1
        self.skipped += skipped
        self.streak = self.streak + 1 if skipped else 0
        if self.streak >= MAX_CONSECUTIVE_SKIPS:
            return (
                f"{self.streak} consecutive steps skipped (skip_nonfinite_steps stops at "
                f"{MAX_CONSECUTIVE_SKIPS})"
            )
        if self.steps >= SKIP_WINDOW and self.skipped > MAX_SKIPPED_FRACTION * self.steps:
            return (
                f"{self.skipped} of this run's {self.steps} steps skipped (skip_nonfinite_steps "
                f"stops above {MAX_SKIPPED_FRACTION:.0%})"
            )
        return None


def _trainer_state(path: Path) -> dict[str, Any]:
    """The counters saved beside the checkpoint as plain JSON ({} for older checkpoints)."""
    state = path / checkpoint.TRAINER_STATE
    return json.loads(state.read_text()) if state.is_file() else {}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _dp_mean(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def check_replicas(module: torch.nn.Module, rank: int, dp_group: object) -> None:
    """Data-parallel replicas must hold identical weights; a silent divergence is a bug."""
    import deepspeed

    replicas = dist.get_world_size(dp_group)
    if replicas == 1:  # one replica has nothing to compare: skip the fp64 pass over the weights
        return
    params = list(module.parameters())
    # Under ZeRO-3 each rank holds a shard: gather the full weights for the check (a no-op
    # context otherwise).
    with deepspeed.zero.GatheredParameters(params), torch.no_grad():
        flat = [p.detach().double().flatten() for p in params]
        local = torch.stack([sum(f.sum() for f in flat), sum(f.square().sum() for f in flat)])
    gathered = [torch.zeros_like(local) for _ in range(replicas)]
    dist.all_gather(gathered, local, group=dp_group)
    sums = [tuple(float(x) for x in g) for g in gathered]
    if rank == 0:
        log.info(
            "data-parallel replicas compared (sum / sum of squares of all weights); "
            "weight checksums per rank: %s",
            " ".join(f"{a:.12e}/{b:.12e}" for a, b in sums),
        )
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"data-parallel replicas diverged: checksums {sums}")
