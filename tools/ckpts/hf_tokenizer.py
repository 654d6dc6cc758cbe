"""Our training tokenizer -> files `transformers.AutoTokenizer.from_pretrained` loads offline.

Each type becomes the same `tokenizers` object our data pipeline runs (HF tokenizer.json and
GPT-2 BPE are such objects already; tiktoken goes through transformers' own TikTokenConverter;
SentencePiece is copied and loaded by transformers' SentencePiece backend). Whatever the route,
the written tokenizer is loaded back and must give our ids on a probe text, or the export is
refused: a tokenizer that silently splits differently is as bad as wrong weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megatron.config.schema import DataConfig
from megatron.data.tokenizers import (
    _CL100K_PAT,
    _GPT2_PAT,
    EOD_TOKEN,
    Tokenizer,
    build_tokenizer,
)

PROBE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All: Speak, speak!  What's 1234 + 56? \t Done."
)


class TokenizerRefused(ValueError):
    """The tokenizer cannot be represented exactly in transformers (the message says why)."""


def _fast(tok_object: Any, ours: Tokenizer) -> Any:
    from transformers import PreTrainedTokenizerFast

    eos = tok_object.id_to_token(ours.eod)
    pad = tok_object.id_to_token(ours.pad)
    return PreTrainedTokenizerFast(tokenizer_object=tok_object, eos_token=eos, pad_token=pad)


def _tiktoken(data: DataConfig, ours: Tokenizer) -> Any:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = data.vocab_file or ""
    pat = _CL100K_PAT if ("cl100k" in path or "o200k" in path) else _GPT2_PAT
    converted = TikTokenConverter(
        vocab_file=path, pattern=pat, extra_special_tokens=[EOD_TOKEN]
    ).converted()
    return _fast(converted, ours)


def _sentencepiece(data: DataConfig, ours: Tokenizer, out: Path) -> Any:
    from transformers import LlamaTokenizer

    shutil.copy(data.vocab_file or "", out / "tokenizer.model")
    sp = ours._sp  # type: ignore[attr-defined]
    return LlamaTokenizer(
        vocab_file=str(out / "tokenizer.model"),
        eos_token=sp.IdToPiece(ours.eod),
        pad_token=sp.IdToPiece(ours.pad),
        add_bos_token=False,
        add_eos_token=False,
    )


def _build(data: DataConfig, ours: Tokenizer, out: Path) -> Any:
    kind = data.tokenizer_type
    if kind in ("HFTokenizer", "GPT2BPETokenizer"):
        return _fast(ours._tok, ours)  # type: ignore[attr-defined]
    if kind == "TiktokenTokenizer":
        return _tiktoken(data, ours)
    if kind == "SPMTokenizer":
        return _sentencepiece(data, ours, out)
    raise TokenizerRefused(
        f"tokenizer_type {kind}: transformers has no tokenizer with its ids (UTF-8 bytes as "
        "ids); pass --skip_tokenizer to export the weights without tokenizer files"
    )


def write_tokenizer(data: DataConfig, out: Path) -> dict[str, int | None]:
    """Write the tokenizer files into `out`; returns the special ids for generation_config."""
    from transformers import AutoTokenizer

    ours = build_tokenizer(data)
    try:
        hf = _build(data, ours, out)
        hf.save_pretrained(str(out))
        back = AutoTokenizer.from_pretrained(str(out))
    except TokenizerRefused:
        raise
    except Exception as e:  # conversion libraries raise many kinds; name the tokenizer
        raise TokenizerRefused(f"{data.tokenizer_type} {data.vocab_file}: {e}") from e
    want = ours.tokenize(PROBE)
    got = back(PROBE, add_special_tokens=False)["input_ids"]
    if got != want:
        raise TokenizerRefused(
            f"{data.tokenizer_type}: the transformers tokenizer splits the probe text "
            f"differently ({got[:12]} vs ours {want[:12]})"
        )
    return {
        "eos_token_id": ours.eod,
        "pad_token_id": ours.pad,
        "bos_token_id": ours.eod,
    }  # NeoX: EOD doubles as BOS
