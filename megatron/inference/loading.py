"""Load a model for streaming: one of our checkpoint directories or a transformers folder.

Our checkpoints (a save directory with `latest`, or one global_stepN, any TP x PP x ZeRO
layout) are read by megatron.checkpoint's `open_checkpoint`: verified (COMPLETE, checksums),
weights-only, merged into the single-device model rebuilt from the saved config's model and
sepllm sections. transformers folders are read strictly by megatron.hf.folder (every tensor
present, shaped as config.json says, finite; a tokenizer that loads), then loaded offline.

Both come back as a `Streamer`: `new_cache(policies, separator_ids, pos_shift)` and
`step(cache, ids [B, n], mask) -> logits [B, n, V]`, so the tools never branch on the world.
Every check (missing weights, separator ids outside the vocabulary, ...) raises before work.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint import ReadOptions, open_checkpoint
from megatron.checkpoint.layout import is_checkpoint
from megatron.hf.folder import open_hf_folder
from megatron.inference.caches import Policy, StreamCache
from megatron.inference.decode import forward_step, model_rotary
from megatron.model.transformer import GPTModel
from megatron.sepllm.separators import separator_ids as derive_separator_ids


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


def load_ours(path: Path, options: ReadOptions = ReadOptions()) -> Streamer:  # noqa: B008
    ck = open_checkpoint(path, options)
    m, sep = ck.cfg.model, ck.cfg.sepllm
    model = GPTModel(m, sep, ck.vocab_rows)
    model.load_state_dict(ck.state_dict(), strict=True)
    data_tok = ck.tokenizer()
    tok = None
    if data_tok is not None:
        ck.check_vocab(data_tok.vocab_size, f"tokenizer {ck.vocab_file()}")
        tok = TextTokenizer(
            data_tok.tokenize, data_tok.detokenize, data_tok.token_to_id, data_tok.eod
        )
    seps = list(sep.separator_token_ids) or (derive_separator_ids(tok) if tok else [])
    return Streamer("ours", model.eval(), ck.vocab_rows, m.num_layers, tok, seps, str(ck.step_dir))


def _hf_separators(config_json: dict[str, Any]) -> list[int] | None:
    entry = config_json.get("sepllm")
    if isinstance(entry, dict):
        entry = entry.get("separator_token_ids")
    return [int(i) for i in entry] if isinstance(entry, list) and entry else None


def load_hf(folder: Path, dtype: torch.dtype = torch.float32) -> Streamer:
    from transformers import AutoModelForCausalLM  # heavy: only for HF folders

    checked = open_hf_folder(folder)  # strict: refuses before transformers fills in anything
    config_json = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    # The config's sepllm kept rule (if any) with the caches' eviction; the caches' ids.
    from megatron.hf.sepllm_attention import apply_sepllm

    apply_sepllm(model)
    hf_tok = checked.tokenizer
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


def load_model(path: str, options: ReadOptions = ReadOptions()) -> Streamer:  # noqa: B008
    """Our checkpoint directory or a transformers folder; a clear error for anything else.
    `options`: the checkpoint-reading keys (megatron.checkpoint.add_read_args)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if is_checkpoint(p):
        return load_ours(p, options)
    if (p / "config.json").is_file():
        return load_hf(p)
    raise FileNotFoundError(
        f"{path!r} is neither one of our checkpoints (latest + global_stepN/ with config.yml "
        "and COMPLETE) nor a transformers folder (config.json + weights)"
    )
