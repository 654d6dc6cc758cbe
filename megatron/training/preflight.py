"""Pre-flight: everything that can be checked before the first step is checked here, once.

`run_preflight(cfg, rank)` runs on every rank after `finalize` and before the datasets and the
engine are built, and raises one `PreflightError` listing every problem found:

- directories: save, load, data prefixes, data_cache_dir, tensorboard_dir, the wandb
  directory and metrics_jsonl are created / probed with a real write, with the path and errno
  in the message (an unwritable save directory would otherwise surface at the first
  checkpoint, after checkpoint_factor steps of work);
- free space on the save directory against an estimate of one checkpoint's size;
- a fresh run into a save directory that already holds checkpoints (refused unless it resumes
  from it, or overwrite_checkpoints says to delete them);
- the checkpoint's own config.yml against this run's (architecture changes refused unless
  finetune; batch and other differences listed in the log);
- options that need a particular setup (skip_nonfinite_steps).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from megatron.checkpoint import layout
from megatron.common.files import LockTimeout, file_lock
from megatron.config.loader import config_to_dict
from megatron.config.schema import Config
from megatron.training import checkpoint
from megatron.training.schedule import OVERRIDDEN, lr_at, warmup_steps
from megatron.training.setup import build_model, sample_counts

log = logging.getLogger("megatron")

# Bytes on disk per parameter of one checkpoint, measured on configs/tiny.yml-style runs
# (fp32, ZeRO 0, Adam; see docs/reliability.md): DeepSpeed's files hold the fp32 weights and
# the two Adam moments (12 B), the layout-independent copy (universal/) the same again.
BYTES_PER_PARAM = {"fp32": 24.5, "bfloat16": 14.5, "fp16": 14.5}
FREE_SPACE_MARGIN = 1.2  # headroom over the estimate: DeepSpeed's pickles, configs, RNG files

# Model keys that change the computed function or the parameter shapes. The others (dropout,
# init of weights that are loaded anyway, fused-kernel switches) may change on a resume.
_NOT_ARCHITECTURE = {
    "attention_dropout",
    "hidden_dropout",
    "rope_fusion",
    "layernorm_fusion",
    "rmsnorm_fusion",
    "init_method",
    "output_layer_init_method",
    "init_method_std",
}
# SepLLM keys that define the kept set (which keys each query attends to).
_KEPT_SET_KEYS = (
    "mode",
    "separator_token_ids",
    "init_tokens",
    "local_window",
    "local_window_per_layer",
    "pad_token_id",
    "batch_adaptive_init_pos",
)
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


class PreflightError(RuntimeError):
    """Something that would fail or lose work later, found before the first step."""


RUN_LOCK = ".run.lock"  # in the save directory; holds "pid N on HOST since TIME" while locked


@contextlib.contextmanager
def save_dir_lock(cfg: Config, rank: int) -> Iterator[None]:
    """One trainer per save directory: rank 0 holds an flock on `<save>/.run.lock` for the
    whole run (released by the kernel when it exits, even when killed). A second run into the
    same directory is refused on every rank, naming the holder, before it builds anything.
    A save directory that cannot be created is left to the pre-flight, which names its errno.
    """
    save = cfg.checkpoint.save
    with contextlib.ExitStack() as held:
        error = ""
        if save and rank == 0:
            try:
                Path(save).mkdir(parents=True, exist_ok=True)
                held.enter_context(file_lock(Path(save) / RUN_LOCK, timeout_s=0))
            except LockTimeout as exc:
                error = (
                    f"save = {save} is in use by another training run ({exc}). Two runs "
                    "writing one directory mix their checkpoints and `latest`: stop the other "
                    "run (or wait for it), or give this one another save directory"
                )
            except OSError:
                pass  # reported by directory_errors with its errno
        if dist.is_initialized() and dist.get_world_size() > 1:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error:
            raise PreflightError(error)
        yield


def run_preflight(cfg: Config, rank: int) -> None:
    """Every check on every rank (each sees its own file systems), then the overwrite."""
    # load_errors first: directory_errors creates the save directory, which may be `load`.
    errors = option_errors(cfg) + index_size_errors(cfg) + load_errors(cfg)
    errors += directory_errors(cfg, rank)
    for warning in schedule_warnings(cfg) if rank == 0 else []:
        log.warning("%s", warning)
    errors += fresh_run_errors(cfg)
    if not errors:
        errors += resume_config_errors(cfg, log_differences=rank == 0)
    if not errors:
        errors += free_space_errors(cfg)
    if errors:
        listed = "\n  - ".join(errors)
        raise PreflightError(f"pre-flight check failed before the first step:\n  - {listed}")
    if rank == 0 and (note := fresh_start_note(cfg)):
        log.warning("%s", note)
    dist.barrier()  # every rank looked at `save` before rank 0 may clear it
    if rank == 0:
        clear_for_overwrite(cfg)
    dist.barrier()


def load_errors(cfg: Config) -> list[str]:
    """A `load` that does not exist is a typo, not an empty directory to start fresh from;
    only the first run of a job that resumes from its own save directory may lack it."""
    ck = cfg.checkpoint
    if not ck.load or os.path.lexists(ck.load):
        return []
    if _loads_from_save(cfg) and ck.allow_fresh_start:
        return []  # created by this run; fresh_start_note says it starts fresh
    return [
        f"load = {ck.load} does not exist ({Path(ck.load).resolve()}; ENOENT), so it holds "
        "no checkpoint to resume from: fix the path (a typo?), or leave load unset to start "
        "from scratch" + ("" if _loads_from_save(cfg) else f" (save = {ck.save})")
    ]


def fresh_start_note(cfg: Config) -> str | None:
    """The warning a run that starts from iteration 0 with random weights logs, naming the
    `load` path it looked in and what it found there; None for a resume or a refused start."""
    ck = cfg.checkpoint
    if not ck.load:
        return "fresh start: `load` is not set, training starts at iteration 0 from random weights"
    if not ck.allow_fresh_start or checkpoint.find_tag(ck) is not None:
        return None  # a resume (the trainer logs it), or resolve_tag refuses the fresh start
    root = Path(ck.load)
    steps = [p.name for _, p, _ in checkpoint.checkpoint_dirs(root)]
    found = f"{', '.join(steps)} but no `latest` file" if steps else "no checkpoint"
    return (
        f"FRESH START: load = {ck.load} ({root.resolve()}) holds {found}; nothing is resumed, "
        "training starts at iteration 0 from random weights (allow_fresh_start: true)"
    )


# The sample index arrays hold at least this much per sample: sample_idx (2 x int64) and
# shuffle_idx (int64); doc_idx comes on top.
INDEX_BYTES_PER_SAMPLE = 24


def index_size_errors(cfg: Config) -> list[str]:
    """A run whose sample index cannot fit in memory (train_iters: 1e12) fails before the
    data is touched, not with a MemoryError after minutes of building it."""
    import psutil  # a DeepSpeed dependency

    samples = sum(sample_counts(cfg))
    need, have = samples * INDEX_BYTES_PER_SAMPLE, psutil.virtual_memory().total
    if need <= have:
        return []
    return [
        f"train_iters {cfg.training.train_iters:,} x global batch {cfg.derived.global_batch} "
        f"(with validation) = {samples:,} samples: their index arrays need at least "
        f"{need / 2**30:,.0f} GiB, more than this host's {have / 2**30:,.0f} GiB of memory; "
        "lower train_iters"
    ]


def schedule_warnings(cfg: Config) -> list[str]:
    s, iters = cfg.schedule, cfg.training.train_iters
    warmup = warmup_steps(s, iters)
    if warmup <= iters:
        return []
    peak = lr_at(iters - 1, cfg.optimizer, s, iters)
    return [
        f"warmup is {warmup} iterations, longer than the run (train_iters {iters}): the "
        f"learning rate never reaches lr {cfg.optimizer.lr:g} (it ends at {peak:.3g})"
    ]


def option_errors(cfg: Config) -> list[str]:
    t = cfg.training
    if not t.skip_nonfinite_steps:
        return []
    stage = t.zero_optimization.get("stage", 0)
    if t.precision != "fp32" or stage != 0 or cfg.parallel.pipe_parallel_size > 1:
        return [
            "skip_nonfinite_steps needs precision fp32, zero_optimization.stage 0 and no "
            f"pipeline (got {t.precision}, stage {stage}, pipe_parallel_size "
            f"{cfg.parallel.pipe_parallel_size}): elsewhere the gradients live in partitions "
            "the skip cannot clear"
        ]
    return []


def _os_error(key: str, path: str | Path, exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "")
    where = exc.filename if exc.filename and str(exc.filename) != str(path) else ""
    return (
        f"{key} = {path}: {exc.strerror or exc}{f' ({code})' if code else ''}"
        f"{f' at {where}' if where else ''}"
    )


def _probe_dir(key: str, path: str | Path, rank: int) -> str | None:
    """Create `path` if needed and write + remove a file in it; None when that worked."""
    probe = Path(path) / f".preflight-rank{rank}-{os.getpid()}"
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return _os_error(key, path, exc)
    return None


def _probe_file(key: str, path: str, rank: int) -> str | None:
    """A file the run appends to: its directory must be writable, the file appendable."""
    target = Path(path)
    err = _probe_dir(key, target.parent, rank)
    if err:
        return err
    if target.is_dir():
        return f"{key} = {path}: is a directory, not a file"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{key} = {path}: exists and is not writable (EACCES)"
    return None


def _data_prefixes(cfg: Config) -> list[tuple[str, str]]:
    d = cfg.data
    out = [("data_path", d.data_path)] if d.data_path else []
    for split in ("train", "valid", "test"):
        out += [(f"{split}_data_paths", p) for p in getattr(d, f"{split}_data_paths")]
    return out


def directory_errors(cfg: Config, rank: int) -> list[str]:
    ck, lg = cfg.checkpoint, cfg.logging
    errors = []
    for key, path in (
        ("save", ck.save),
        ("data_cache_dir", cfg.data.data_cache_dir),
        ("tensorboard_dir", lg.tensorboard_dir),
        ("wandb_dir", (lg.wandb_dir or ck.save or ".") if lg.use_wandb else None),
    ):
        err = path and _probe_dir(key, path, rank)
        if err:
            errors.append(err)
    if lg.metrics_jsonl and rank == 0:  # only rank 0 writes it
        err = _probe_file("metrics_jsonl", lg.metrics_jsonl, rank)
        if err:
            errors.append(err)
    if ck.load and Path(ck.load).exists():
        if not Path(ck.load).is_dir():
            errors.append(f"load = {ck.load}: not a directory")
        elif not os.access(ck.load, os.R_OK | os.X_OK):
            errors.append(f"load = {ck.load}: not readable (EACCES)")
    for key, prefix in _data_prefixes(cfg):
        for suffix in (".bin", ".idx"):
            path = f"{prefix}{suffix}"
            if not os.path.isfile(path):
                errors.append(f"{key}: {path} does not exist (ENOENT)")
            elif not os.access(path, os.R_OK):
                errors.append(f"{key}: {path} is not readable (EACCES)")
    return errors


def _loads_from_save(cfg: Config) -> bool:
    ck = cfg.checkpoint
    return bool(ck.save and ck.load) and Path(ck.save).resolve() == Path(ck.load).resolve()


def _resumes_from_save(cfg: Config) -> bool:
    return _loads_from_save(cfg) and not cfg.checkpoint.finetune


def _existing(root: Path) -> list[str]:
    names = [p.name for _, p, _ in checkpoint.checkpoint_dirs(root)]
    return names + ([layout.LATEST] if (root / layout.LATEST).is_file() else [])


def fresh_run_errors(cfg: Config) -> list[str]:
    """A run that does not resume from `save` must not write over the checkpoints there."""
    ck = cfg.checkpoint
    if not ck.save or _resumes_from_save(cfg):
        return []
    found = _existing(Path(ck.save))
    if not found:
        return []
    if _loads_from_save(cfg):  # a finetune: overwriting would delete its own source
        return [
            f"save = {ck.save} is also the finetune source (load); a finetune restarts at "
            "iteration 0 and would write over it: give save a new directory"
        ]
    if ck.overwrite_checkpoints:
        return []
    latest = Path(ck.save) / layout.LATEST
    named = f", latest = {latest.read_text().strip()}" if latest.is_file() else ""
    return [
        f"save = {ck.save} already holds checkpoints ({len(found)} entries{named}) and this "
        f"run does not resume from it (load = {ck.load}); training would overwrite them and "
        "move `latest` back, mixing two runs. Resume with load: <the same directory>, use a "
        "new save directory, or set overwrite_checkpoints: true to delete them first"
    ]


def clear_for_overwrite(cfg: Config) -> None:
    ck = cfg.checkpoint
    if not (ck.save and ck.overwrite_checkpoints) or _loads_from_save(cfg):
        return  # never delete the checkpoint this run loads
    root = Path(ck.save)
    found = _existing(root)
    if not found:
        return
    log.warning("overwrite_checkpoints: deleting %s from %s", " ".join(found), root)
    (root / layout.LATEST).unlink(missing_ok=True)  # first: `latest` never names a deleted one
    for _, path, _ in checkpoint.checkpoint_dirs(root):
        shutil.rmtree(path)


def _flat(tree: dict[str, Any]) -> dict[tuple[str, str], Any]:
    sections = ((s, keys) for s, keys in tree.items() if isinstance(keys, dict))
    return {(s, k): v for s, keys in sections for k, v in keys.items()}


def _change(section: str, key: str, old: Any, new: Any) -> str:
    return f"{section}.{key}: {old!r} -> {new!r}"


def _is_architecture(section: str, key: str) -> bool:
    if section == "model":
        return key not in _NOT_ARCHITECTURE
    return section == "sepllm" and key in _KEPT_SET_KEYS


def resume_config_errors(cfg: Config, log_differences: bool = True) -> list[str]:
    """Compare the checkpoint's own config.yml (and saved run shape) with this run's."""
    ck = cfg.checkpoint
    tag = checkpoint.find_tag(ck) if ck.load else None
    saved_file = Path(ck.load or "") / (tag or "") / layout.CONFIG
    if tag is None or not saved_file.is_file():
        return []
    saved = _flat(yaml.safe_load(saved_file.read_text()) or {})
    now = _flat(config_to_dict(cfg))
    diffs = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    arch = [_change(s, k, a, b) for (s, k), (a, b) in diffs.items() if _is_architecture(s, k)]
    shape = _saved_shape(saved_file.parent)
    arch += _vocab_changes(shape, cfg, same_tp=("parallel", "model_parallel_size") not in diffs)
    if arch and not ck.finetune:
        return [
            f"the checkpoint {saved_file.parent} was trained with another architecture: "
            + "; ".join(arch)
            + ". Resuming would load its weights into a different model: restore these "
            "values, train into a new directory (--set save=DIR --set load=DIR), or set "
            "finetune: true to start a new run from its weights"
        ]
    hyper = [_change(s, k, a, b) for (s, k), (a, b) in diffs.items() if (s, k) in OVERRIDDEN]
    if hyper and not ck.finetune and not cfg.schedule.override_lr_scheduler:
        # DeepSpeed restores the optimizer's param groups and the scheduler's base lr from the
        # checkpoint, so a changed value would be silently ignored.
        return [
            f"resuming from {saved_file.parent} with other optimizer / schedule values than "
            f"it was trained with: {'; '.join(hyper)}. Set override_lr_scheduler: true to "
            "apply the new values from the resumed step on, or restore them"
        ]
    zero = _zero_dp_change(saved, shape, cfg)
    if zero and not ck.finetune:
        return [f"the checkpoint {saved_file.parent} {zero}"]
    if log_differences:
        _log_differences(saved_file.parent, diffs, ck.finetune)
        for line in data_changes(_saved_state(saved_file.parent).get("data_files"), cfg):
            log.warning("resume: %s", line)
    return []


def _zero_dp_change(
    saved: dict[tuple[str, str], Any], shape: dict[str, Any], cfg: Config
) -> str | None:
    """ZeRO partitions the optimizer state over the data-parallel ranks; DeepSpeed cannot
    load those partitions at another data-parallel size (an exception deep inside it)."""
    stage = (saved.get(("training", "zero_optimization")) or {}).get("stage", 0)
    old, new = shape.get("data_parallel_size"), cfg.derived.data_parallel_size
    if not stage or old is None or old == new:
        return None
    return (
        f"holds ZeRO stage {stage} optimizer partitions for data-parallel size {old}, this run "
        f"has {new}: DeepSpeed cannot repartition them. Resume with the same number of "
        "data-parallel ranks (world size / (tensor x pipeline parallel)), or set finetune: "
        "true to start a new run from its weights with a fresh optimizer"
    )


FINGERPRINT_BYTES = 1 << 20  # hashed at each end of every data file


def data_fingerprints(cfg: Config) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of the first and last MiB of every data file the run reads, saved
    with each checkpoint so a resume notices a changed corpus (re-tokenized, regrown, ...)."""
    out = {}
    for _, prefix in _data_prefixes(cfg):
        for suffix in (".bin", ".idx"):
            path = f"{prefix}{suffix}"
            with contextlib.suppress(OSError), open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                h = hashlib.sha256(f.read(FINGERPRINT_BYTES))
                if size > FINGERPRINT_BYTES:
                    f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                    h.update(f.read(FINGERPRINT_BYTES))
                out[os.path.abspath(path)] = {"size": size, "sha256_ends": h.hexdigest()}
    return out


def data_changes(saved: dict[str, dict[str, Any]] | None, cfg: Config) -> list[str]:
    """What differs between the data files the checkpoint's run read and this run's."""
    if not saved:
        return []  # a checkpoint from before fingerprints
    now = data_fingerprints(cfg)
    out = [
        f"data file {p} changed since the checkpoint was saved (size {saved[p]['size']} -> "
        f"{now[p]['size']}, other content): the resumed run reads other samples than the "
        "interrupted one would have"
        for p in sorted(set(now) & set(saved))
        if now[p] != saved[p]
    ]
    if set(now) != set(saved):
        out.append(
            f"data files differ from the checkpoint's run: it read {sorted(saved)}, this run "
            f"reads {sorted(now)}"
        )
    return out


def _vocab_changes(shape: dict[str, Any], cfg: Config, same_tp: bool) -> list[str]:
    """The tokenizer's vocabulary must match; the padded one too unless the tensor-parallel
    degree changed (padding is to a multiple of TP; resharding handles that)."""
    d, out = cfg.derived, []
    keys = ("vocab_size", "padded_vocab_size") if same_tp else ("vocab_size",)
    for key in keys:
        old, new = shape.get(key), getattr(d, key, None)
        if old is not None and old != new:
            out.append(f"{key.replace('_', ' ')}: {old} -> {new}")
    return out


def _saved_shape(path: Path) -> dict[str, Any]:
    return _saved_state(path).get("run_shape", {})


def _saved_state(path: Path) -> dict[str, Any]:
    state = path / checkpoint.TRAINER_STATE
    return json.loads(state.read_text()) if state.is_file() else {}


def _log_differences(
    path: Path, diffs: dict[tuple[str, str], tuple[Any, Any]], finetune: bool
) -> None:
    if not diffs:
        return
    if finetune:  # a new run from the weights: its own config is expected to differ
        names = ", ".join(f"{s}.{k}" for s, k in diffs)
        log.info("finetune: this run's config applies (differs from %s in %s)", path, names)
        return
    batch = [k for (s, k) in diffs if s == "training" and k in _BATCH_KEYS]
    if batch:
        log.info(
            "resume: batch changed (%s); data continues at the checkpoint's consumed_samples",
            ", ".join(_change("training", k, *diffs[("training", k)]) for k in batch),
        )
    lines = [_change(s, k, a, b) for (s, k), (a, b) in diffs.items()]
    log.info("resume: config differs from %s/config.yml: %s", path, "; ".join(lines))


def estimate_checkpoint_bytes(cfg: Config) -> int:
    # build_model seeds torch: fork the RNG so the run's random stream is untouched.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg).parameters())
    return int(n * BYTES_PER_PARAM[cfg.training.precision])


def free_space_errors(cfg: Config) -> list[str]:
    if not cfg.checkpoint.save:
        return []
    need = estimate_checkpoint_bytes(cfg) * FREE_SPACE_MARGIN
    free = shutil.disk_usage(cfg.checkpoint.save).free
    if free >= need:
        return []
    return [
        f"save = {cfg.checkpoint.save}: {free / 2**20:,.1f} MiB free, but one checkpoint of "
        f"this model needs about {need / 2**20:,.1f} MiB (ENOSPC at the first save)"
    ]
