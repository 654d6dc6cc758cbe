"""Checkpoints through DeepSpeed, with an atomic `latest`, RNG/data state, and retention.

Layout: <save>/global_step<N>/ (DeepSpeed files + rng_rank<r>.pt + config.yml + configs/ +
COMPLETE) and <save>/latest (the tag). `latest` is replaced by rename only after every rank has
finished writing, so a crash mid-save leaves the previous checkpoint as latest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpoint import layout, safe_load, writer
from megatron.checkpoint.reader import ReadOptions, open_checkpoint
from megatron.checkpoint.safe_load import CheckpointLoadError
from megatron.common.files import atomic_write_text
from megatron.config.schema import CheckpointConfig

COMPLETE = layout.COMPLETE
TRAINER_STATE = layout.TRAINER_STATE  # the client state (iteration, consumed samples, evals)
log = logging.getLogger("megatron")


class CheckpointError(RuntimeError):
    pass


tag_for = layout.tag_for


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine: Any,
    ckpt: CheckpointConfig,
    iteration: int,
    client_state: dict[str, Any],
    resolved_config: dict[str, Any],
    raw_configs: dict[str, str],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save on every rank; `extra(dir)` (called on every rank) adds files before COMPLETE.

    `client_state` is also written as `trainer_state.json` (plain JSON: reading it back runs
    no code). An OSError while writing (ENOSPC, EACCES ...) becomes a CheckpointError naming
    the directory, the errno and the free space; `latest` then still names the previous one.
    """
    root = Path(ckpt.save)
    tag = tag_for(iteration)
    rank = dist.get_rank()
    out = root / tag
    with _explain_os_error(root, out):
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), out / layout.rng_file(rank))
        if extra is not None:
            extra(out)
        if rank == 0:
            writer.write_config(out, resolved_config, raw_configs)
            atomic_write_text(out / TRAINER_STATE, json.dumps(client_state))
    dist.barrier()
    if rank == 0:
        with _explain_os_error(root, out):
            # Checksums of every file, verified before a load (bit rot is refused).
            writer.finish(root, out, iteration)
        prune(root, ckpt.keep_last_n_checkpoints, keep=tag)
    dist.barrier()
    return out


@contextlib.contextmanager
def _explain_os_error(root: Path, out: Path) -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:
        # torch's zip writer turns a failed write (ENOSPC, EFBIG) into "unexpected pos" /
        # "file write failed" with no path or errno: name the checkpoint and the likely cause.
        text = str(exc)
        if "unexpected pos" not in text and "file write failed" not in text:
            raise
        raise CheckpointError(
            f"saving checkpoint {out} failed: a file write stopped short ({text.strip()}): "
            f"the disk is full (ENOSPC) or a file size limit was reached (EFBIG, ulimit -f); "
            f"{_free_space(root)}. `latest` still names {_latest_of(root)}; the incomplete "
            f"{out.name} is cleaned by retention once a newer checkpoint is complete."
        ) from exc
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "unknown errno")
        raise CheckpointError(
            f"saving checkpoint {out} failed: {exc.strerror or exc} ({code}) at "
            f"{exc.filename or out}; {_free_space(root)}. `latest` still names "
            f"{_latest_of(root)}; the incomplete "
            f"{out.name} is cleaned by retention once a newer checkpoint is complete."
        ) from exc


def _free_space(root: Path) -> str:
    try:
        return f"{shutil.disk_usage(root).free / 2**20:,.0f} MiB free on {root}"
    except OSError:
        return f"free space on {root} unknown"


def _latest_of(root: Path) -> str:
    latest = root / layout.LATEST
    return latest.read_text().strip() if latest.is_file() else "nothing"


def checkpoint_dirs(root: Path) -> list[tuple[int, Path, bool]]:
    """(iteration, directory, complete) of every `global_step<N>` directory, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := layout.TAG.match(p.name))]
    return sorted((n, p, (p / COMPLETE).is_file()) for n, p in found if p.is_dir())


def prune(root: Path, keep_last: int | None, keep: str | None = None) -> list[Path]:
    """Retention: keep the newest `keep_last` complete checkpoints, and `keep` (the one
    `latest` names, even if a resumed older iteration made it not the newest); returns what
    was deleted.

    Only directories with a COMPLETE marker count toward the limit. An incomplete one (a save
    killed midway) is reported, and deleted only when older than the newest complete
    checkpoint: a newer one may still be written by a run, or be all that is left of one.
    """
    dirs = checkpoint_dirs(root)
    complete = [p for _, p, ok in dirs if ok]
    newest = max((n for n, _, ok in dirs if ok), default=None)
    doomed = [p for p in complete[:-keep_last] if p.name != keep] if keep_last else []
    for n, p, ok in dirs:
        if ok:
            continue
        older = newest is not None and n < newest
        log.warning(
            "checkpoint %s is incomplete (no %s marker): %s",
            p,
            COMPLETE,
            "deleting it (older than the newest complete checkpoint)"
            if older
            else "kept (not older than the newest complete checkpoint); it is never loaded",
        )
        if older:
            doomed.append(p)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def find_tag(ckpt: CheckpointConfig) -> str | None:
    """The tag to load, None if `load` holds no checkpoint; raises on a broken one."""
    root = Path(ckpt.load)
    if ckpt.iteration is not None:
        tag = tag_for(ckpt.iteration)
        if not (root / tag).is_dir():
            raise CheckpointError(
                f"iteration {ckpt.iteration} requested but {root / tag} is missing"
            )
    else:
        latest = root / layout.LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (root / tag).is_dir():
            raise CheckpointError(
                f"{latest} names {tag!r}, but {root / tag} does not exist (deleted or moved?); "
                f"checkpoints there: {[p.name for _, p, _ in checkpoint_dirs(root)] or 'none'}. "
                "Set `iteration: N` to load one of them"
            )
    if not (root / tag / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {root / tag} is incomplete (no {COMPLETE} marker)")
    return tag


def resolve_tag(ckpt: CheckpointConfig) -> str | None:
    """The tag to load; None (fresh start) only when allowed; raises otherwise."""
    tag = find_tag(ckpt)
    if tag is None and not ckpt.allow_fresh_start:
        raise CheckpointError(
            f"load = {ckpt.load} holds no checkpoint (no 'latest' file); refusing to start from "
            "iteration 0 silently. Fix the path or set allow_fresh_start: true."
        )
    if tag is not None:  # the one reader's checks: COMPLETE, checksums, strict config.yml
        open_checkpoint(Path(ckpt.load) / tag, ReadOptions.of(ckpt))
    return tag


def load(engine: Any, ckpt: CheckpointConfig, tag: str) -> int:
    """Load a checkpoint of the same layout; returns the iteration to continue from."""
    finetune, unsafe = ckpt.finetune, ckpt.allow_unsafe_checkpoint_load
    safe_load.install(engine, unsafe)  # DeepSpeed's own files: no code runs on load either
    where = Path(ckpt.load) / tag
    try:
        path, client = engine.load_checkpoint(
            ckpt.load,
            tag=tag,
            load_module_only=finetune,
            load_optimizer_states=not finetune,
            load_lr_scheduler_states=not finetune,
        )
    except (RuntimeError, KeyError, ValueError) as exc:
        if isinstance(exc, CheckpointLoadError):
            raise
        # torch / DeepSpeed name neither the checkpoint nor the key that made it not fit.
        raise CheckpointError(
            f"loading checkpoint {where} (checkpoint.load = {ckpt.load}) failed: "
            f"{type(exc).__name__}: {exc}. A shape mismatch means the model section "
            "(num_layers, hidden_size, vocab / padding, ...) differs from the saved run's "
            f"{where / 'config.yml'}."
        ) from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {where}")
    if finetune:
        return 0
    rng = where / layout.rng_file(dist.get_rank())
    if rng.is_file():
        _set_rng_state(safe_load.load_file(rng, allow_unsafe=unsafe))
    return int(client["iteration"])
