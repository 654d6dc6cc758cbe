"""Derive SepLLM separator token ids for any tokenizer from the separator strings.

Algorithm (tokenizer-agnostic): every candidate string is encoded without special tokens, and
the candidate is a separator token iff it encodes to exactly one token. Candidates are the
paper's set `. , ? ! ; : " " \\t \\n` (in that order, which is the order of the published
Pythia list), then, with `extended=True`, the variants byte-level BPEs merge into one token:
a leading space before each punctuation mark (" ."), space runs ("  ", "   ", ...), newline /
tab runs and space+newline mixes. Ids are deduplicated, first candidate wins.

For GPT-2 (gpt2.tiktoken) the basic set gives . 13, `,` 11, ? 30, ! 0, ; 26, : 25, \\t 197,
\\n 198, space 220; for GPT-NeoX-20B's tokenizer.json the same rule gives the Pythia list
[15, 13, 32, 2, 28, 27, 209, 186, 187] (the ids of the same strings in that vocabulary).
Limitation: a SentencePiece tokenizer that glues a "▁" prefix onto every word may encode "."
as two tokens; such candidates are then looked up directly in the vocabulary if possible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BASIC_SEPARATORS: tuple[str, ...] = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")
_PUNCT = (".", ",", "?", "!", ";", ":")

# pat_str of GPT-2's byte-level BPE (also r50k / p50k).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class SeparatorToken:
    id: int
    text: str  # the decoded token text


def extended_candidates(max_space_run: int = 16) -> list[str]:
    """Variants beyond the basic set that byte-level BPEs often hold as single tokens."""
    out = [" " + p for p in _PUNCT]
    out += [p + "\n" for p in _PUNCT]
    out += [" " * n for n in range(2, max_space_run + 1)]
    out += ["\n" * n for n in range(2, 5)] + ["\t" * n for n in range(2, 5)]
    out += [" \n", "\n ", " \n\n", "\n\n ", " \t", "\t\n"]
    return out


def separator_tokens(
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    extended: bool = False,
    lookup: Callable[[str], int | None] | None = None,
    max_space_run: int = 16,
) -> list[SeparatorToken]:
    """Separator tokens of a tokenizer given its encode / decode (and optional vocab lookup)."""
    candidates = list(BASIC_SEPARATORS)
    if extended:
        candidates += extended_candidates(max_space_run)
    seen: set[int] = set()
    found: list[SeparatorToken] = []
    for text in candidates:
        ids = encode(text)
        tid = ids[0] if len(ids) == 1 else (lookup(text) if lookup else None)
        if tid is None or tid in seen:
            continue
        seen.add(tid)
        found.append(SeparatorToken(int(tid), decode([tid])))
    return found


def _tiktoken_codec(path: str, pat: str | None):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(path)
    base = os.path.basename(path)
    if pat is None:
        pat = CL100K_PAT if ("cl100k" in base or "o200k" in base) else GPT2_PAT
    enc = tiktoken.Encoding(name=base, pat_str=pat, mergeable_ranks=ranks, special_tokens={})

    def lookup(text: str) -> int | None:
        return ranks.get(text.encode("utf-8"))

    return enc.encode_ordinary, enc.decode, lookup


def _hf_codec(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    def lookup(text: str) -> int | None:
        # SentencePiece-style vocabularies spell spaces as "▁".
        return tok.token_to_id(text.replace(" ", "\u2581"))

    return encode, decode, lookup


def load_codec(path: str, pat: str | None = None):
    """(encode, decode, lookup) for an HF tokenizer.json or a .tiktoken rank file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.endswith(".json"):
        return _hf_codec(path)
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"{":  # a tokenizer.json under another name
        json.loads(open(path, encoding="utf-8").read())
        return _hf_codec(path)
    return _tiktoken_codec(path, pat)


def separator_ids_for_file(
    path: str, extended: bool = False, pat: str | None = None
) -> list[SeparatorToken]:
    encode, decode, lookup = load_codec(path, pat)
    return separator_tokens(encode, decode, extended=extended, lookup=lookup)


def default_tiktoken_file() -> str | None:
    """whisper ships gpt2.tiktoken; locate it without importing whisper (its import fails)."""
    import importlib.util

    spec = importlib.util.find_spec("whisper")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "assets", "gpt2.tiktoken")
    return path if os.path.isfile(path) else None


def format_table(tokens: Sequence[SeparatorToken]) -> str:
    return "\n".join(f"{t.id:>8}  {t.text!r}" for t in tokens)
