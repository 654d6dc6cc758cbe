"""`open_checkpoint(path) -> Checkpoint`: the one reader of the checkpoints our trainer writes.

Before anything is used: the path must name a `global_stepN` directory (or a save directory
whose `latest` names one) with a COMPLETE marker; every file is checked against the SHA-256
manifest in COMPLETE (bit rot, truncation and missing files are refused naming the file);
config.yml is parsed strictly (unknown keys are an error with the closest known key). Weights
are read on demand (`state_dict()`), weights-only (no code runs from the files), from whatever
layout the run used (megatron/checkpoint/weights.py), merged into the single-device model's
names. The opt-outs are the trainer's own keys: `verify_checkpoint_checksums: false` and
`allow_unsafe_checkpoint_load: true` (as `--verify_checkpoint_checksums false` /
`--allow_unsafe_checkpoint_load` on the tools' command lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint import checksums, layout
from megatron.checkpoint.weights import CheckpointRefused, read_weights
from megatron.config.loader import ConfigError, load_config
from megatron.config.schema import CheckpointConfig, Config

log = logging.getLogger("megatron")
Tensor = torch.Tensor


@dataclass(frozen=True)
class ReadOptions:
    """The trainer's two checkpoint-reading keys (checkpoint section), same defaults."""

    verify_checkpoint_checksums: bool = True
    allow_unsafe_checkpoint_load: bool = False

    @classmethod
    def of(cls, ck: CheckpointConfig) -> ReadOptions:
        return cls(ck.verify_checkpoint_checksums, ck.allow_unsafe_checkpoint_load)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def add_read_args(p: argparse.ArgumentParser) -> None:
    """The reading keys as command-line options of a tool that opens checkpoints."""
    p.add_argument(
        "--verify_checkpoint_checksums",
        type=_bool,
        default=True,
        help="check every file against COMPLETE's checksums before use (default true)",
    )
    p.add_argument(
        "--allow_unsafe_checkpoint_load",
        action="store_true",
        help="unpickle with weights_only=False (runs code stored in the files; trusted only)",
    )


def read_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(
        getattr(args, "verify_checkpoint_checksums", True),
        getattr(args, "allow_unsafe_checkpoint_load", False),
    )


@dataclass
class Checkpoint:
    step_dir: Path
    cfg: Config
    iteration: int
    options: ReadOptions
    _weights: tuple[dict[str, Tensor], str] | None = field(default=None, repr=False)

    def _read(self) -> tuple[dict[str, Tensor], str]:
        if self._weights is None:
            unsafe = self.options.allow_unsafe_checkpoint_load
            self._weights = read_weights(self.step_dir, self.cfg, unsafe)
        return self._weights

    def state_dict(self) -> dict[str, Tensor]:
        """The full single-device state dict (GPTModel names), read once."""
        return self._read()[0]

    @property
    def source(self) -> str:
        """Which files the weights came from (universal, zero_to_fp32, ...)."""
        return self._read()[1]

    @property
    def vocab_rows(self) -> int:
        return int(self.state_dict()["embedding.embed.weight"].shape[0])

    def run_shape(self) -> dict[str, Any]:
        """The run shape the trainer recorded in trainer_state.json ({} when absent)."""
        state = self.step_dir / layout.TRAINER_STATE
        return json.loads(state.read_text()).get("run_shape", {}) if state.is_file() else {}

    def check_vocab(self, tokenizer_vocab: int, what: str) -> None:
        """Refuse a tokenizer of another size than the one this model trained with (its
        recorded vocab_size) or with more entries than the embedding has rows."""
        recorded, rows = self.run_shape().get("vocab_size"), self.vocab_rows
        if tokenizer_vocab > rows or (recorded is not None and tokenizer_vocab != recorded):
            trained = f"the run's tokenizer had {recorded}; " if recorded is not None else ""
            raise CheckpointRefused(
                f"{what} has {tokenizer_vocab} entries but {self.step_dir} was trained with "
                f"another vocabulary ({trained}embedding rows: {rows})"
            )

    def vocab_file(self) -> str | None:
        """The data section's vocab_file, found as written, beside the save directory or its
        parent (relative paths are kept relative to where training ran)."""
        vocab = self.cfg.data.vocab_file
        if not vocab or os.path.isfile(vocab):
            return vocab
        for base in (self.step_dir.parent, self.step_dir.parent.parent):
            if (base / vocab).is_file():
                return str(base / vocab)
        return vocab

    def tokenizer(self) -> Any:
        """The data tokenizer the run trained with (megatron.data), or None when its file is
        gone (the tools then say so)."""
        from megatron.data.tokenizers import make_tokenizer

        data, vocab = self.cfg.data, self.vocab_file()
        if data.tokenizer_type != "CharLevelTokenizer" and not (vocab and os.path.isfile(vocab)):
            return None
        return make_tokenizer(data.tokenizer_type, vocab, data.merge_file)


def find_step_dir(path: str | os.PathLike) -> Path:
    """The `global_stepN` directory `path` names; refuses anything else by name."""
    p = Path(path)
    if not p.exists():
        raise CheckpointRefused(f"checkpoint path {p} does not exist")
    if (p / layout.LATEST).is_file() and not (p / layout.CONFIG).is_file():
        tag = (p / layout.LATEST).read_text().strip()
        if not (p / tag).is_dir():
            raise CheckpointRefused(f"{p / layout.LATEST} names {tag}, which is missing")
        p = p / tag
    if not p.is_dir():
        raise CheckpointRefused(f"{p} is not a checkpoint directory")
    return p


def check_complete(step_dir: Path, options: ReadOptions) -> int:
    """Refuse an incomplete or damaged checkpoint; returns its iteration. Verification is
    shared by the ranks when torch.distributed is initialized (the trainer's resume)."""
    if not (step_dir / layout.COMPLETE).is_file():
        raise CheckpointRefused(
            f"checkpoint {step_dir} is incomplete (no {layout.COMPLETE} marker): its save did "
            "not finish"
        )
    if options.verify_checkpoint_checksums:
        checksums.verify_all_ranks(step_dir, layout.COMPLETE)
    manifest = checksums.read_manifest(step_dir, layout.COMPLETE)
    if manifest is not None and "iteration" in manifest:
        return int(manifest["iteration"])
    match = layout.TAG.match(step_dir.name)
    return int(match.group(1)) if match else 0


def open_checkpoint(
    path: str | os.PathLike,
    options: ReadOptions = ReadOptions(),  # noqa: B008  (frozen: safe as a default)
    check: Callable[[Config], None] | None = None,
) -> Checkpoint:
    """The verified checkpoint at `path`; `check(cfg)` runs before any weight is read
    (refusing an unusable architecture should not wait for a large load)."""
    step_dir = find_step_dir(path)
    iteration = check_complete(step_dir, options)
    config = step_dir / layout.CONFIG
    if not config.is_file():
        raise CheckpointRefused(f"{step_dir} has no {layout.CONFIG} (not written by our trainer)")
    try:
        cfg = load_config([config])
    except ConfigError as exc:
        raise CheckpointRefused(f"{config}: {exc}") from exc
    if check is not None:
        check(cfg)
    return Checkpoint(step_dir, cfg, iteration, options)
