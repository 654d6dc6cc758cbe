"""A transformers GPT-NeoX / Llama folder -> a checkpoint of ours, exact or refused.

The folder is read strictly (megatron/hf/folder.py: every tensor present, shaped as
config.json says, floating point, finite, none left over; the tokenizer loads unless
`skip_tokenizer`), the architecture mapped exactly (megatron/hf/configs.py) and the key map
consumes every tensor (megatron/hf/adapters.py), all before the output directory appears.
What is written is a checkpoint as the trainer writes it, through megatron.checkpoint:
`global_step0/` with config.yml, the layout-independent copy the trainer reshards at load
time (so it fine-tunes at any TP x PP), trainer_state.json (the tokenizer's vocabulary) and a
COMPLETE with checksums; `latest`; the tokenizer as `tokenizer/tokenizer.json`; and
`finetune.yml` with the model keys, the layout asked for, `finetune: true` and `load:`.
Every tool of ours (export, generation, streaming perplexity, lm-eval) reads it as it is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron.checkpoint import layout, writer
from megatron.common.files import atomic_dir, refuse_existing
from megatron.config.loader import config_to_dict
from megatron.config.schema import Config, ModelConfig, SepLLMConfig
from megatron.hf.adapters import from_hf
from megatron.hf.configs import UnmappedOption, config_from_hf
from megatron.hf.export import sepllm_from_entry
from megatron.hf.folder import HFFolder, open_hf_folder

TOKENIZER = "tokenizer/tokenizer.json"  # relative to the output directory


def _divisor(vocab: int, tp: int) -> int:
    """make_vocab_size_divisible_by that pads any tokenizer up to the HF embedding's rows."""
    if vocab % tp:
        raise UnmappedOption(f"vocab_size {vocab} does not split over model_parallel_size {tp}")
    return vocab // tp


def _write_tokenizer(folder: HFFolder, out: Path) -> int:
    """The folder's tokenizer as a tokenizer.json our HFTokenizer (the data pipeline) reads;
    returns its size as our data pipeline counts it."""
    from megatron.data.tokenizers import make_tokenizer

    backend = getattr(folder.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnmappedOption(
            f"{folder.path}: the tokenizer has no `tokenizers` backend (a slow tokenizer); "
            "pass --skip_tokenizer and bring a tokenizer.json"
        )
    (out / TOKENIZER).parent.mkdir()
    backend.save(str(out / TOKENIZER))
    return make_tokenizer("HFTokenizer", str(out / TOKENIZER)).vocab_size


def _config(m: ModelConfig, sep: SepLLMConfig, tp: int, pp: int, tokenizer: bool) -> Config:
    cfg = Config(model=m, sepllm=sep)
    cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size = tp, pp
    cfg.checkpoint.finetune = True
    if tokenizer:
        cfg.data.tokenizer_type, cfg.data.vocab_file = "HFTokenizer", TOKENIZER
    else:
        cfg.data.vocab_file = None
    return cfg


def _finetune_yaml(cfg: Config, final: Path, tokenizer: bool) -> str:
    keys: dict[str, Any] = {
        **dataclasses.asdict(cfg.model),
        "model_parallel_size": cfg.parallel.model_parallel_size,
        "pipe_parallel_size": cfg.parallel.pipe_parallel_size,
        "finetune": True,
        "load": str(final),
    }
    if cfg.sepllm.mode != "full":  # an exported SepLLM model keeps training with its kept set
        keys["sepllm"] = dataclasses.asdict(cfg.sepllm)
    head = ""
    if tokenizer:
        keys.update(tokenizer_type="HFTokenizer", vocab_file=str(final / TOKENIZER))
    else:
        head = (
            "# Imported with --skip_tokenizer: no tokenizer was written. Add the model's\n"
            "# tokenizer_type and vocab_file before training or evaluating.\n"
        )
    return head + yaml.safe_dump(keys, sort_keys=False)


def import_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    model_parallel_size: int = 1,
    pipe_parallel_size: int = 1,
    seq_length: int | None = None,
    skip_tokenizer: bool = False,
) -> Path:
    """Convert; returns the output directory. Nothing is written unless every check passed."""
    out = Path(output_dir)
    refuse_existing(out)
    folder = open_hf_folder(input_dir, skip_tokenizer, config_from_hf)
    m = config_from_hf(folder.config, seq_length)
    state = {k: v.to(torch.float32) for k, v in from_hf(folder.state, m).items()}
    rows = int(state["embedding.embed.weight"].shape[0])
    m.make_vocab_size_divisible_by = _divisor(rows, model_parallel_size)
    entry = getattr(folder.config, "sepllm", None)
    sep = sepllm_from_entry(entry) if isinstance(entry, dict) else SepLLMConfig()
    cfg = _config(m, sep, model_parallel_size, pipe_parallel_size, not skip_tokenizer)
    with atomic_dir(out) as tmp:
        shape: dict[str, int] = {"padded_vocab_size": rows}
        if not skip_tokenizer:
            shape["vocab_size"] = _write_tokenizer(folder, tmp)
        text = _finetune_yaml(cfg, out.resolve(), not skip_tokenizer)
        (tmp / "finetune.yml").write_text(text)
        step = tmp / layout.tag_for(0)
        step.mkdir()
        state_json = {"iteration": 0, "consumed_samples": 0, "run_shape": shape}
        (step / layout.TRAINER_STATE).write_text(json.dumps(state_json))
        source = f"convert_hf_to_neox from {input_dir}"
        writer.write_full_checkpoint(tmp, step, state, config_to_dict(cfg), {}, source)
    return out
