"""A transformers model folder, read strictly: exact or refused before anything uses it.

transformers' own `from_pretrained` fills a missing tensor with random values (a warning at
most), drops an unexpected one, casts an int tensor and loads NaNs; a converter or evaluator
built on it would report numbers of a model nobody trained. Here the weights are read
(safetensors, or a .bin through the weights-only loader; an index must name files that
exist) and compared with the model class config.json names, built on the meta device:
every tensor it needs present with its shape (which checks layers, hidden size, heads,
vocabulary and tying against config.json), floating point, finite, and none left over. The
tokenizer must be present and load, unless the caller was told to do without it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint.safe_load import CheckpointLoadError, load_file

Tensor = torch.Tensor
SAFETENSORS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFE_INDEX, BIN, BIN_INDEX)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Buffers older transformers versions saved with the weights (causal masks, rotary
# frequencies): recomputed by every model, so accepted and ignored.
HF_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


class HFFolderRefused(ValueError):
    """The folder is not exactly a model we can use (the message names the tensor/key/file)."""


class HFFolderMissing(HFFolderRefused, FileNotFoundError):
    """A file the folder needs (config.json, weights, a shard) is not there."""


@dataclass
class HFFolder:
    path: Path
    config: Any  # transformers PretrainedConfig
    state: dict[str, Tensor]  # every weight, as stored (tied head absent when tied)
    tokenizer: Any | None  # transformers tokenizer, None with skip_tokenizer


def _shards(folder: Path, index: str) -> list[Path]:
    try:
        names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise HFFolderRefused(f"{folder / index} is not a valid weight index: {exc}") from exc
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise HFFolderMissing(f"{folder / index} names shard(s) that are missing: {missing}")
    return [folder / n for n in names]


def _read_file(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(file))
        except (SafetensorError, OSError) as exc:
            raise HFFolderRefused(f"{file} cannot be read (corrupted or truncated): {exc}") from exc
    try:
        return load_file(file, map_location="cpu")
    except CheckpointLoadError as exc:  # code in the pickle, or a damaged file: named
        raise HFFolderRefused(str(exc)) from exc


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's weight files (a sharded index: every shard it names)."""
    for single, index in ((SAFETENSORS, SAFE_INDEX), (BIN, BIN_INDEX)):
        if (folder / index).is_file():
            files = _shards(folder, index)
            break
        if (folder / single).is_file():
            files = [folder / single]
            break
    else:
        expected = ", ".join(WEIGHT_FILES)
        raise HFFolderMissing(f"{folder} has no weights (expected one of {expected})")
    state: dict[str, Tensor] = {}
    for file in files:
        for key, value in _read_file(file).items():
            if key in state:
                raise HFFolderRefused(f"{file}: tensor {key} is also in another shard")
            state[key] = value
    return state


def _renamed(state: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
    """The stored names as the model class names them: transformers' registered renamings
    for the class (e.g. GPT-NeoX's legacy `embed_out.` -> `lm_head.`); a class whose
    registered conversions do more than rename (merge or split tensors) is refused."""
    from transformers.conversion_mapping import (
        WeightRenaming,
        extract_weight_conversions_for_model,
    )

    rules = []
    for conv in extract_weight_conversions_for_model(model) or []:
        if type(conv) is not WeightRenaming:
            raise HFFolderRefused(
                f"{type(model).__name__}: transformers converts its stored weights with "
                f"{type(conv).__name__}, which this reader does not apply"
            )
        rules += [
            (re.compile(a), b)
            for a, b in zip(conv.source_patterns, conv.target_patterns, strict=True)
        ]
    out = {}
    for key, value in state.items():
        for pattern, target in rules:
            key = pattern.sub(target, key)
        out[key] = value
    return out


def meta_model(config: Any) -> Any:
    """The config's transformers model class, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def expected_tensors(model: Any) -> tuple[dict[str, torch.Size], set[str], str]:
    """(name -> shape of every tensor the config's model class holds, the names that may be
    absent because they are tied to the input embedding, the input embedding's name)."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    embed = next(f"{name}.weight" for name, mod in model.named_modules() if mod is inp)
    tied: set[str] = set()
    if out is not None and out.weight is inp.weight:
        tied = {f"{name}.weight" for name, mod in model.named_modules() if mod is out}
    return shapes, tied, embed


def check_tensors(state: dict[str, Tensor], config: Any, where: Path) -> dict[str, Tensor]:
    """Refuse, naming the tensor, anything but exactly the tensors the config's model needs;
    returns the tensors under the model's names."""
    model = meta_model(config)
    state = _renamed(state, model)
    shapes, tied, embed = expected_tensors(model)
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    present = {k for k in state if not k.endswith(HF_BUFFERS)}
    out = model.get_output_embeddings()
    head = {f"{n}.weight" for n, mod in model.named_modules() if out is not None and mod is out}
    if not present & (set(shapes) - head):  # the head's name (lm_head) is shared by families
        raise HFFolderRefused(
            f"{where}: config.json names {arch} but the weights hold none of its tensors (they "
            f"belong to another architecture, e.g. {sorted(present)[:3]})"
        )
    missing = sorted(set(shapes) - present - tied)
    extra = sorted(present - set(shapes))
    if missing or extra:
        raise HFFolderRefused(
            f"{where}: the weights do not match config.json ({arch}, {config.num_hidden_layers} "
            f"layers): missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, not used by "
            f"the model {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    for key in sorted(present):
        value = state[key]
        if tuple(value.shape) != tuple(shapes[key]):
            raise HFFolderRefused(
                f"{where}: tensor {key} has shape {tuple(value.shape)}, config.json implies "
                f"{tuple(shapes[key])} (hidden size / heads / vocab_size / layers differ)"
            )
        if not value.is_floating_point():
            raise HFFolderRefused(f"{where}: tensor {key} is {value.dtype}, not floating point")
        if not torch.isfinite(value).all():
            raise HFFolderRefused(f"{where}: tensor {key} holds non-finite values (NaN / inf)")
    for key in tied & present:  # a stored head under tie_word_embeddings is the embedding
        if not torch.equal(state[key], state[embed]):
            raise HFFolderRefused(
                f"{where}: config.json ties the embeddings (tie_word_embeddings: true) but "
                f"{key} differs from {embed}: the model would lose its head"
            )
    return state


def load_tokenizer(folder: Path, vocab_rows: int) -> Any:
    """The folder's transformers tokenizer; refused when absent, unreadable, or larger than
    the embedding."""
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise HFFolderRefused(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); pass "
            "--skip_tokenizer to go on without one"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # tokenizers / transformers raise many kinds; name the folder
        raise HFFolderRefused(f"{folder}: the tokenizer does not load: {exc}") from exc
    if len(tok) > vocab_rows:
        raise HFFolderRefused(
            f"{folder}: the tokenizer has {len(tok)} entries, the embedding {vocab_rows} rows"
        )
    return tok


def open_hf_folder(
    path: str | Path, skip_tokenizer: bool = False, check: Callable[[Any], None] | None = None
) -> HFFolder:
    """config.json + weights + tokenizer, every check above passed; `check(config)` runs
    before any weight is read."""
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise HFFolderMissing(f"{folder} has no config.json (not a transformers model folder)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise HFFolderRefused(f"{folder / 'config.json'}: {exc}") from exc
    if check is not None:
        check(config)
    state = check_tensors(read_weights(folder), config, folder)
    tok = None if skip_tokenizer else load_tokenizer(folder, int(config.vocab_size))
    return HFFolder(folder, config, state, tok)
