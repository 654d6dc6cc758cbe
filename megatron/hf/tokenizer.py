"""Our training tokenizer -> files `transformers.AutoTokenizer.from_pretrained` loads offline.

Each type becomes a `tokenizers` object with our data pipeline's ids (HF tokenizer.json and
GPT-2 BPE are such objects already; tiktoken goes through transformers' own TikTokenConverter;
SentencePiece is rebuilt from its .model file with SentencePiece's normalizer and splits).
Whatever the route, the written tokenizer is loaded back and must give our ids on a probe text
(whitespace runs, digits, non-ASCII for byte fallback), or the export is refused: a tokenizer
that silently splits differently is as bad as wrong weights.
"""

from __future__ import annotations

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
    "All: Speak, speak!  What's 1234 + 56? \t Done.\n"
    "  Caf\u00e9 na\u00efve \u2014 \u00bfs\u00ed?  \n"
)


SPM_SPACE = "\u2581"  # SentencePiece's visible space
SPM_CONTROL = 3  # ModelProto.SentencePiece.Type.CONTROL (eos, pad, ...)


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


def _spm_normalizer(spec: Any) -> Any:
    """SentencePiece's normalizer_spec as `tokenizers` normalizers, in its order: character
    map, whitespace clean-up, the dummy prefix on the whole text, spaces as U+2581."""
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPM_SPACE))
    return normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])


def _sentencepiece(data: DataConfig, ours: Tokenizer) -> Any:
    """The .model file as a `tokenizers` object with SentencePiece's behaviour: its BPE or
    unigram model with byte fallback (transformers' extractor), its normalizer, its split at
    each U+2581 and digit, control pieces as special tokens, and a decoder that undoes the
    dummy prefix. User-defined pieces (e.g. newline) stay ordinary vocabulary: as added tokens
    they would cut the text into segments that each got a dummy prefix, unlike SentencePiece."""
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    extractor = SentencePieceExtractor(data.vocab_file or "")
    proto, parts = extractor.proto, extractor.extract(None)
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, parts["vocab"], parts.get("merges"))
    tok.normalizer = _spm_normalizer(proto.normalizer_spec)
    split = [pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="never", split=True)]
    if proto.trainer_spec.split_digits:
        split.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    control = [p.piece for p in proto.pieces if p.type == SPM_CONTROL]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    undo = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        undo.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(undo)
    return _fast(tok, ours)


def _build(data: DataConfig, ours: Tokenizer) -> Any:
    kind = data.tokenizer_type
    if kind in ("HFTokenizer", "GPT2BPETokenizer"):
        return _fast(ours._tok, ours)  # type: ignore[attr-defined]
    if kind == "TiktokenTokenizer":
        return _tiktoken(data, ours)
    if kind == "SPMTokenizer":
        return _sentencepiece(data, ours)
    raise TokenizerRefused(
        f"tokenizer_type {kind}: transformers has no tokenizer with its ids (UTF-8 bytes as "
        "ids); pass --skip_tokenizer to export the weights without tokenizer files"
    )


def write_tokenizer(data: DataConfig, out: Path) -> dict[str, int | None]:
    """Write the tokenizer files into `out`; returns the special ids for generation_config."""
    from transformers import AutoTokenizer

    ours = build_tokenizer(data)
    try:
        hf = _build(data, ours)
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
