"""Layout-independent checkpoints: full (unsharded) weights and Adam state keyed by the
single-device parameter names, so a run saved at one TP/PP layout resumes at another.

Written beside DeepSpeed's own files as `<tag>/universal/{state.pt,meta.json}` (names and
writer in megatron/checkpoint); loaded
when the saved layout differs from the current one. Scope: ZeRO stage 0 with the fp32
optimizer (ZeRO 1-3 and the bf16 optimizer keep Adam state in flat partitions; resuming those
at another layout is refused with a clear error).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron.checkpoint import layout as disk
from megatron.checkpoint import safe_load, writer
from megatron.config.schema import Config
from megatron.model.transformer import GPTModel
from megatron.parallel.layers import Layout, param_layouts
from megatron.parallel.topology import Parallelism
from megatron.training.pipeline import pipe_names

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def supported(cfg: Config) -> str | None:
    """None when this run's optimizer state can be written layout-independently, else why."""
    if cfg.training.zero_optimization.get("stage", 0) != 0:
        return "ZeRO stage > 0 partitions the optimizer state"
    if cfg.training.precision != "fp32":
        return "the bf16/fp16 optimizers keep flat fp32 master copies"
    return None


def _local_names(module: torch.nn.Module, cfg: Config, pipeline: bool) -> dict[str, str]:
    """local parameter name -> single-device name (a tied weight has one name on every stage
    holding it, `tied_modules.embed.*`)."""
    params = dict(module.named_parameters())
    if not pipeline:
        return {n: n for n in params}
    inverse = {pipe: full for full, pipe in pipe_names(_full_param_names(cfg), cfg).items()}
    return {local: inverse[local] for local in params if local in inverse}


def _full_param_names(cfg: Config) -> list[str]:
    """The single-device parameter names. Built on the meta device without build_model: its
    seeding would reset the run's random stream at every pipeline save and load."""
    d = cfg.derived
    with torch.device("meta"):
        model = GPTModel(cfg.model, cfg.sepllm, d.padded_vocab_size, d.windows)
    return [k for k, _ in model.named_parameters()]


def _local_entries(engine: Any, cfg: Config, par: Parallelism) -> dict[str, tuple[Layout, dict]]:
    """{full name: (layout, {"param": shard, "exp_avg": shard, ...})} for this rank's
    parameters; the layout is the one the owning layer declares."""
    module, opt = engine.module, engine.optimizer
    names = _local_names(module, cfg, par.pp_size > 1)
    layouts = param_layouts(module)
    out = {}
    for local, p in module.named_parameters():
        if local not in names:
            continue
        state = opt.state.get(p, {})
        entry = {"param": p.detach().cpu().clone()}
        entry.update({k: state[k].detach().cpu().clone() for k in STATE_KEYS if k in state})
        if "step" in state:
            entry["step"] = float(state["step"])
        out[names[local]] = (layouts[local], entry)
    return out


def gather_full(engine: Any, cfg: Config, par: Parallelism) -> dict[str, dict] | None:
    """Full tensors on global rank 0 (None elsewhere). Every rank must call this."""
    local = _local_entries(engine, cfg, par) if par.dp_rank == 0 else {}
    gathered: list[Any] = [None] * dist.get_world_size()
    # Objects, not tensors: stages hold different parameter sets. Fine at the scales this
    # path targets; a sharded writer would avoid funnelling everything through rank 0.
    dist.all_gather_object(gathered, (par.tp.rank, local))
    if dist.get_rank() != 0:
        return None
    by_name: dict[str, dict[int, dict]] = {}
    layout_of: dict[str, Layout] = {}
    for tp_rank, entries in gathered:
        for name, (layout, entry) in entries.items():
            by_name.setdefault(name, {})[tp_rank] = entry
            layout_of[name] = layout
    full = {}
    for name, shards in by_name.items():
        ordered, layout = [shards[r] for r in sorted(shards)], layout_of[name]
        full[name] = {k: layout.unshard([s[k] for s in ordered]) for k in ordered[0] if k != "step"}
        if "step" in ordered[0]:
            full[name]["step"] = ordered[0]["step"]
    return full


def save(path: Path, engine: Any, cfg: Config, par: Parallelism, iteration: int) -> None:
    """Every rank calls this; rank 0 writes the layout (always) and the full state (when it
    can be written layout-independently)."""
    why = supported(cfg)
    full = gather_full(engine, cfg, par) if why is None else None
    if dist.get_rank() != 0:
        return
    meta = {
        "iteration": iteration,
        "model_parallel_size": cfg.parallel.model_parallel_size,
        "pipe_parallel_size": max(1, cfg.parallel.pipe_parallel_size),
        "full_state": full is not None,
        "why_not": why,
    }
    writer.write_universal(path, full, meta)


def saved_iteration(path: Path) -> int:
    return int(_meta(path)["iteration"])


def _meta(path: Path) -> dict[str, Any]:
    meta = disk.read_universal_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{disk.universal_dir(path)} holds no {disk.UNIVERSAL_META}")
    return meta


def restore_counters(engine: Any, scheduler: Any, iteration: int) -> None:
    """Put the step counters where the saved run left them (the LR follows the step)."""
    engine.global_steps = iteration
    engine.global_samples = iteration * engine.train_batch_size()
    scheduler.last_epoch = iteration - 1
    # No optimizer step has run in this process yet: torch would warn that step() skips the
    # schedule's first value, but this step() only moves the LR to the restored counter.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()


def saved_layout(path: Path) -> tuple[int, int] | None:
    m = disk.read_universal_meta(path)
    return None if m is None else (m["model_parallel_size"], m["pipe_parallel_size"])


def load(path: Path, engine: Any, cfg: Config, par: Parallelism, finetune: bool) -> None:
    """Load full state into this rank's (possibly sharded / staged) parameters."""
    meta = _meta(path)
    if not meta["full_state"]:
        raise RuntimeError(
            f"{path} was saved at TP x PP = {meta['model_parallel_size']} x "
            f"{meta['pipe_parallel_size']} without a layout-independent copy ({meta['why_not']}); "
            "resume it at that layout (layout changes need ZeRO stage 0 and fp32 when saving)"
        )
    if supported(cfg) is not None and not finetune:
        raise RuntimeError(
            f"resharding {path} restores Adam state for ZeRO stage 0 with fp32 only "
            f"({supported(cfg)} in this run); use finetune: true to load the weights only"
        )
    state_file = disk.universal_dir(path) / disk.UNIVERSAL_STATE
    full = safe_load.load_file(state_file, allow_unsafe=cfg.checkpoint.allow_unsafe_checkpoint_load)
    module, opt = engine.module, engine.optimizer
    names = _local_names(module, cfg, par.pp_size > 1)
    layouts = param_layouts(module)
    params = dict(module.named_parameters())
    rank, size = par.tp.rank, par.tp.size
    with torch.no_grad():
        for local, p in params.items():
            if local not in names:  # every stage's copy of a tied weight has its name too
                raise KeyError(f"no layout-independent source for parameter {local}")
            name = names[local]
            if name not in full:
                raise KeyError(f"{state_file} holds no parameter {name}")
            entry, layout = full[name], layouts[local]
            p.copy_(_fit(layout.shard(entry["param"], rank, size), p, name, state_file))
            if finetune or "exp_avg" not in entry:
                continue
            opt.state[p] = {
                k: layout.shard(entry[k], rank, size).to(p.device).clone() for k in STATE_KEYS
            }
            opt.state[p]["step"] = torch.tensor(entry["step"])


def _fit(saved: torch.Tensor, param: torch.Tensor, name: str, source: Path) -> torch.Tensor:
    """`saved` if it fits `param`; else an error naming the parameter, both shapes and file
    (copy_ would only say that the sizes do not match)."""
    if saved.shape != param.shape:
        raise ValueError(
            f"parameter {name}: {source} holds shape {tuple(saved.shape)} for this rank, the "
            f"model has {tuple(param.shape)}; the model section differs from the saved run's"
        )
    return saved
