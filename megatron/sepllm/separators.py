"""Derive SepLLM separator token ids for any tokenizer from the separator strings.

Algorithm (tokenizer-agnostic): every candidate string is encoded without special tokens, and
the candidate is a separator token iff it encodes to exactly one token. Candidates are the
paper's set `. , ? ! ; : " " \\t \\n` (in that order, which is the order of the published
Pythia list), then, with `extended=True`, the variants byte-level BPEs merge into one token:
a leading space before each punctuation mark (" ."), space runs ("  ", "   ", ...), newline /
tab runs and space+newline mixes. Ids are deduplicated, first candidate wins.

The tokenizer is an object, not a file: the one that tokenizes the data (any
`megatron.data.tokenizers` tokenizer, e.g. `build_tokenizer(cfg.data)`, satisfies
`SeparatorVocab`), so the ids cannot come from a differently loaded copy. This module builds
no tokenizer itself (sepllm imports nothing but `common`); `tools/sepllm/separator_ids.py`
builds one from a file or a config.

For GPT-2 (gpt2.tiktoken) the basic set gives . 13, `,` 11, ? 30, ! 0, ; 26, : 25, \\t 197,
\\n 198, space 220; for GPT-NeoX-20B's tokenizer.json the same rule gives the Pythia list
[15, 13, 32, 2, 28, 27, 209, 186, 187] (the ids of the same strings in that vocabulary).
Limitation: a SentencePiece tokenizer that glues a "▁" prefix onto every word may encode "."
as two tokens; such candidates are then looked up directly in the vocabulary if possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

BASIC_SEPARATORS: tuple[str, ...] = (".", ",", "?", "!", ";", ":", " ", "\t", "\n")
_PUNCT = (".", ",", "?", "!", ";", ":")


class SeparatorVocab(Protocol):
    """What the derivation needs of a tokenizer (the NeoX tokenizer interface)."""

    def tokenize(self, text: str) -> list[int]:
        """Ids of `text`, without special tokens."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, text: str) -> int | None:
        """The vocabulary entry spelled `text`, or None."""
        ...


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
    tokenizer: SeparatorVocab, extended: bool = False, max_space_run: int = 16
) -> list[SeparatorToken]:
    """Separator tokens of `tokenizer`, in candidate order."""
    candidates = list(BASIC_SEPARATORS)
    if extended:
        candidates += extended_candidates(max_space_run)
    seen: set[int] = set()
    found: list[SeparatorToken] = []
    for text in candidates:
        ids = tokenizer.tokenize(text)
        tid = ids[0] if len(ids) == 1 else tokenizer.token_to_id(text)
        if tid is None or tid in seen:
            continue
        seen.add(int(tid))
        found.append(SeparatorToken(int(tid), tokenizer.detokenize([tid])))
    return found


def separator_ids(tokenizer: SeparatorVocab, extended: bool = False) -> list[int]:
    """The ids for `sepllm.separator_token_ids`."""
    return [t.id for t in separator_tokens(tokenizer, extended=extended)]


def format_table(tokens: Sequence[SeparatorToken]) -> str:
    return "\n".join(f"{t.id:>8}  {t.text!r}" for t in tokens)
