"""Load a model for streaming: one of our checkpoint directories or a transformers folder.

Our checkpoints: `<save>/latest` + `<save>/global_stepN/{config.yml, mp_rank_00_model_states.pt}`
(or the global_stepN directory itself); the model is rebuilt from the saved config's model and
sepllm sections, the vocabulary from the embedding's shape. transformers folders: config.json +
weights (safetensors or .bin), GPTNeoX or Llama, loaded offline.

Both come back as a `Streamer`: `new_cache(policies, separator_ids, pos_shift)` and
`step(cache, ids [B, n], mask) -> logits [B, n, V]`, so the tools never branch on the world.
Every check (missing weights, separator ids outside the vocabulary, ...) raises before work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron.config.schema import DataConfig, ModelConfig, SepLLMConfig
from megatron.data.tokenizers import make_tokenizer
from megatron.inference.caches import Policy, StreamCache
from megatron.inference.decode import forward_step, model_rotary
from megatron.model.transformer import GPTModel
from megatron.sepllm.separators import separator_ids as derive_separator_ids

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class TextTokenizer:
    """What the tools need of a tokenizer: tokenize / detokenize / token_to_id / eod."""

    def __init__(
        self,
        tokenize: Callable[[str], list[int]],
        detokenize: Callable[[Sequence[int]], str],
        token_to_id: Callable[[str], int | None],
        eod: int | None,
    ) -> None:
        self.tokenize, self.detokenize, self.token_to_id, self.eod = (
            tokenize,
            detokenize,
            token_to_id,
            eod,
        )


@dataclass
class Streamer:
    world: str  # "ours" or "hf"
    model: torch.nn.Module
    vocab_size: int
    num_layers: int
    tokenizer: TextTokenizer | None
    default_separator_ids: list[int]
    source: str

    def new_cache(
        self, policies: list[Policy], separator_ids: Sequence[int], pos_shift: bool
    ) -> Any:
        check_separator_ids(separator_ids, self.vocab_size)
        if self.world == "ours":
            return StreamCache(policies, separator_ids, pos_shift, model_rotary(self.model))
        from megatron.inference.hf_cache import StreamingCache, hf_rotary  # transformers: heavy

        stream = StreamCache(policies, separator_ids, pos_shift, hf_rotary(self.model))
        return StreamingCache(stream)

    def stream_of(self, cache: Any) -> StreamCache:
        return cache if isinstance(cache, StreamCache) else cache.stream

    def step(self, cache: Any, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.world == "ours":
            return forward_step(self.model, cache, ids, mask)
        from megatron.inference.hf_cache import hf_step

        return hf_step(self.model, cache, ids, mask)


def check_separator_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(f"separator token ids {bad} are outside the vocabulary [0, {vocab_size})")


def _checkpoint_dir(path: Path) -> Path | None:
    """The global_stepN directory of an our-checkpoint path, or None if it is not one."""
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / "config.yml").is_file() and (path / "mp_rank_00_model_states.pt").is_file():
        return path
    return None


def _section(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in names})


def _our_tokenizer(data: DataConfig, step_dir: Path) -> TextTokenizer | None:
    vocab = data.vocab_file
    if vocab and not os.path.isfile(vocab) and (step_dir.parent.parent / vocab).is_file():
        vocab = str(step_dir.parent.parent / vocab)
    if data.tokenizer_type != "CharLevelTokenizer" and not (vocab and os.path.isfile(vocab)):
        return None
    tok = make_tokenizer(data.tokenizer_type, vocab, data.merge_file)
    return TextTokenizer(tok.tokenize, tok.detokenize, tok.token_to_id, tok.eod)


def load_ours(step_dir: Path) -> Streamer:
    cfg = yaml.safe_load((step_dir / "config.yml").read_text())
    m = _section(ModelConfig, cfg.get("model", {}))
    sep = _section(SepLLMConfig, cfg.get("sepllm", {}))
    state = torch.load(
        step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    weights = state.get("module", state)
    vocab = int(weights["embedding.embed.weight"].shape[0])
    model = GPTModel(m, sep, vocab)
    model.load_state_dict(weights, strict=True)
    tok = _our_tokenizer(_section(DataConfig, cfg.get("data", {})), step_dir)
    seps = list(sep.separator_token_ids) or (derive_separator_ids(tok) if tok else [])
    return Streamer("ours", model.eval(), vocab, m.num_layers, tok, seps, str(step_dir))


def _hf_separators(config_json: dict[str, Any]) -> list[int] | None:
    entry = config_json.get("sepllm")
    if isinstance(entry, dict):
        entry = entry.get("separator_token_ids")
    return [int(i) for i in entry] if isinstance(entry, list) and entry else None


def load_hf(folder: Path, dtype: torch.dtype = torch.float32) -> Streamer:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only for HF folders

    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{folder} has a config.json but no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )
    config_json = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    tok = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        tok = TextTokenizer(
            lambda t: hf_tok.encode(t, add_special_tokens=False),
            lambda ids: hf_tok.decode(list(ids)),
            lambda t: hf_tok.convert_tokens_to_ids(t) if t in hf_tok.get_vocab() else None,
            hf_tok.eos_token_id,
        )
    seps = _hf_separators(config_json) or (derive_separator_ids(tok) if tok else [])
    vocab = int(model.get_input_embeddings().weight.shape[0])
    layers = int(model.config.num_hidden_layers)
    return Streamer("hf", model.eval(), vocab, layers, tok, seps, str(folder))


def load_model(path: str) -> Streamer:
    """Our checkpoint directory or a transformers folder; a clear error for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {path!r} does not exist")
    step_dir = _checkpoint_dir(p)
    if step_dir is not None:
        return load_ours(step_dir)
    if (p / "config.json").is_file():
        return load_hf(p)
    raise FileNotFoundError(
        f"{path!r} is neither one of our checkpoints (latest + global_stepN/config.yml + "
        "mp_rank_00_model_states.pt) nor a transformers folder (config.json + weights)"
    )
