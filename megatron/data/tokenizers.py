"""Tokenizers with the NeoX interface, chosen by ``DataConfig.tokenizer_type``.

Every tokenizer exposes ``vocab_size``, ``eod`` (end-of-document id appended between documents),
``pad``, ``tokenize`` and ``detokenize``; ``tokenize_batch`` is the fast path preprocessing uses;
``token_to_id`` looks a string up in the vocabulary. The same objects serve SepLLM's separator
derivation (``megatron.sepllm.separators.separator_tokens``), so separator ids always come from
the tokenizer that tokenizes the data; ``tokenizer_for_file`` picks the type from a file.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
_EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<eos>", "<|eos|>", "<eod>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "<|pad|>", "[PAD]")

# Pre-tokenisation regexes of the OpenAI encodings (tiktoken files carry only the ranks).
_GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class Tokenizer(ABC):
    vocab_size: int
    eod: int
    pad: int

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def token_to_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled ``text``, or None (no such single entry)."""
        return None

    @property
    def eod_id(self) -> int:  # NeoX spelling
        return self.eod


def _require_file(path: str | None, what: str, tokenizer_type: str) -> str:
    if not path:
        raise FileNotFoundError(f"{tokenizer_type} needs {what} (set vocab_file / merge_file)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tokenizer_type}: {what} {path!r} does not exist")
    return path


def _first_id(lookup: Any, names: Sequence[str]) -> int | None:
    for name in names:
        i = lookup(name)
        if i is not None:
            return int(i)
    return None


class HFTokenizer(Tokenizer):
    """A HuggingFace ``tokenizers`` tokenizer.json (what tools/train_tokenizer.py writes)."""

    def __init__(self, vocab_file: str | None) -> None:
        from tokenizers import Tokenizer as _Tok

        path = _require_file(vocab_file, "a tokenizer.json", "HFTokenizer")
        try:
            self._tok = _Tok.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"HFTokenizer: cannot load {path!r}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eod = _first_id(self._tok.token_to_id, _EOD_CANDIDATES)
        if eod is None:
            raise ValueError(f"HFTokenizer: {path!r} has none of the EOD tokens {_EOD_CANDIDATES}")
        self.eod = eod
        pad = _first_id(self._tok.token_to_id, _PAD_CANDIDATES)
        self.pad = eod if pad is None else pad

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking: ~10% faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, text: str) -> int | None:
        i = self._tok.token_to_id(text)
        if i is None and " " in text:  # SentencePiece-style vocabularies spell spaces "▁"
            i = self._tok.token_to_id(text.replace(" ", "\u2581"))
        return i


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2 style vocab.json + merges.txt, run through HF tokenizers' byte-level BPE."""

    def __init__(self, vocab_file: str | None, merge_file: str | None) -> None:
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers

        vocab = _require_file(vocab_file, "vocab.json", "GPT2BPETokenizer")
        merges = _require_file(merge_file, "merges.txt", "GPT2BPETokenizer")
        tok = _Tok(models.BPE.from_file(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eod = _first_id(tok.token_to_id, _EOD_CANDIDATES)
        if eod is None:
            raise ValueError(f"GPT2BPETokenizer: {vocab!r} lacks {EOD_TOKEN!r}")
        # Special tokens must never be split by BPE merges.
        tok.add_special_tokens([tok.id_to_token(eod)])
        self.eod = eod
        pad = _first_id(tok.token_to_id, _PAD_CANDIDATES)
        self.pad = eod if pad is None else pad


class SPMTokenizer(Tokenizer):
    """A SentencePiece .model file."""

    def __init__(self, vocab_file: str | None) -> None:
        import sentencepiece as spm

        path = _require_file(vocab_file, "a SentencePiece .model", "SPMTokenizer")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except Exception as e:  # OSError / RuntimeError depending on the version
            raise ValueError(f"SPMTokenizer: cannot load {path!r}: {e}") from e
        self.vocab_size = self._sp.GetPieceSize()

        def lookup(piece: str) -> int | None:
            i = self._sp.PieceToId(piece)
            return None if i == self._sp.unk_id() else i

        eod = _first_id(lookup, _EOD_CANDIDATES)
        self.eod = eod if eod is not None else self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"SPMTokenizer: {path!r} defines no EOS/EOD piece")
        pad = self._sp.pad_id()
        self.pad = pad if pad >= 0 else self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.Encode(texts, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_to_id(self, text: str) -> int | None:
        i = self._sp.PieceToId(text.replace(" ", "\u2581"))
        return None if i == self._sp.unk_id() else int(i)


def default_tiktoken_file() -> str | None:
    """whisper ships gpt2.tiktoken; locate it without importing whisper (its import fails)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "assets", "gpt2.tiktoken")
    return path if os.path.isfile(path) else None


class TiktokenTokenizer(Tokenizer):
    """A .tiktoken rank file (base64 token, rank per line); EOD appended after the ranks."""

    def __init__(self, vocab_file: str | None) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = vocab_file or default_tiktoken_file()
        path = _require_file(path, "a .tiktoken file", "TiktokenTokenizer")
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:
            raise ValueError(f"TiktokenTokenizer: cannot parse {path!r}: {e}") from e
        base = os.path.basename(path)
        pat = _CL100K_PAT if ("cl100k" in base or "o200k" in base) else _GPT2_PAT
        self.eod = len(ranks)
        self._enc = tiktoken.Encoding(
            name=base, pat_str=pat, mergeable_ranks=ranks, special_tokens={EOD_TOKEN: self.eod}
        )
        self.vocab_size = self._enc.n_vocab
        self.pad = self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_to_id(self, text: str) -> int | None:
        try:
            return self._enc.encode_single_token(text.encode("utf-8"))
        except KeyError:
            return None


class CharLevelTokenizer(Tokenizer):
    """UTF-8 bytes as ids (NeoX: vocab 512, EOD 0), so any text round-trips exactly."""

    def __init__(self, vocab_size: int = 512) -> None:
        self.vocab_size = vocab_size
        self.eod = 0
        self.pad = 0

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")


TOKENIZER_TYPES = (
    "HFTokenizer",
    "SPMTokenizer",
    "GPT2BPETokenizer",
    "TiktokenTokenizer",
    "CharLevelTokenizer",
)


def make_tokenizer(
    tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None
) -> Tokenizer:
    if tokenizer_type == "HFTokenizer":
        return HFTokenizer(vocab_file)
    if tokenizer_type == "SPMTokenizer":
        return SPMTokenizer(vocab_file)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "TiktokenTokenizer":
        return TiktokenTokenizer(vocab_file)
    if tokenizer_type == "CharLevelTokenizer":
        return CharLevelTokenizer()
    raise ValueError(f"unknown tokenizer_type {tokenizer_type!r}; choose one of {TOKENIZER_TYPES}")


def infer_tokenizer_type(path: str, merge_file: str | None = None) -> str:
    """The tokenizer type of a file: tokenizer.json (HF; also under another name), a
    SentencePiece .model, vocab.json + merges.txt (GPT-2 BPE), else a .tiktoken rank file."""
    if merge_file:
        return "GPT2BPETokenizer"
    if path.endswith(".json"):
        return "HFTokenizer"
    if path.endswith(".model"):
        return "SPMTokenizer"
    _require_file(path, "a tokenizer file", "tokenizer_for_file")
    with open(path, "rb") as f:
        head = f.read(1)
    return "HFTokenizer" if head == b"{" else "TiktokenTokenizer"


def tokenizer_for_file(path: str | None = None, merge_file: str | None = None) -> Tokenizer:
    """The tokenizer a file holds (type from ``infer_tokenizer_type``); no path: GPT-2's BPE
    (whisper's gpt2.tiktoken)."""
    if path is None:
        return TiktokenTokenizer(None)
    return make_tokenizer(infer_tokenizer_type(path, merge_file), path, merge_file)


def build_tokenizer(cfg: Any) -> Tokenizer:
    """Build the tokenizer named by a ``DataConfig`` (tokenizer_type, vocab_file, merge_file)."""
    return make_tokenizer(cfg.tokenizer_type, cfg.vocab_file, cfg.merge_file)
