"""Streaming readers for preprocessing inputs: jsonl / txt, optionally .gz or .zst compressed.

The reader hands out raw byte lines in batches (cheap, in the main process); decoding and JSON
parsing happen in the workers via ``parse_lines``, which skips and counts bad lines rather than
emitting garbage or aborting a multi-hour job on one broken record.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

SKIP_REASONS = ("invalid_json", "non_utf8", "empty", "missing_key")


def check_input(path: str) -> None:
    """Fail before any work starts if an input cannot be read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input {path!r} does not exist")
    if path.endswith(".zst") and not _have_zstd():
        raise RuntimeError(f"{path}: .zst input needs `pip install zstandard` or the zstd binary")


def _have_zstd() -> bool:
    try:
        import zstandard  # noqa: F401

        return True
    except ImportError:
        return shutil.which("zstd") is not None


def input_format(path: str) -> str:
    """'jsonl' or 'txt' from the name, ignoring a compression suffix."""
    base = path[: -len(".gz")] if path.endswith(".gz") else path
    base = base[: -len(".zst")] if base.endswith(".zst") else base
    return "txt" if base.endswith((".txt", ".text")) else "jsonl"


def open_binary(path: str) -> IO[bytes]:
    check_input(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
        except ImportError:
            proc = subprocess.Popen(["zstd", "-dc", path], stdout=subprocess.PIPE)
            assert proc.stdout is not None
            return proc.stdout
    return open(path, "rb")


def iter_line_batches(path: str, batch_lines: int = 256) -> Iterator[tuple[int, list[bytes]]]:
    """Yield (1-based number of the first line, raw lines) in batches; memory stays flat."""
    with open_binary(path) as raw:
        stream = raw if hasattr(raw, "readline") else io.BufferedReader(raw)
        batch: list[bytes] = []
        first = 1
        for lineno, line in enumerate(stream, start=1):
            if not batch:
                first = lineno
            batch.append(line)
            if len(batch) >= batch_lines:
                yield first, batch
                batch = []
        if batch:
            yield first, batch


@dataclass
class ParseResult:
    texts: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: list[tuple[int, str]] = field(default_factory=list)  # (line, reason), first few


def parse_lines(lines: list[bytes], first_line: int, fmt: str, json_key: str) -> ParseResult:
    """Decode one batch of raw lines into document texts, counting what had to be skipped."""
    res = ParseResult()
    for k, raw in enumerate(lines):
        reason = None
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            s, reason = "", "non_utf8"
        text = ""
        if reason is None and fmt == "jsonl":
            if not s.strip():
                reason = "empty"
            else:
                try:
                    obj = json.loads(s)
                except json.JSONDecodeError:
                    obj, reason = None, "invalid_json"
                if reason is None:
                    value = obj.get(json_key) if isinstance(obj, dict) else None
                    if not isinstance(value, str):
                        reason = "missing_key"
                    else:
                        text = value
        elif reason is None:
            # "txt": one document per line; "txtfile": the line is a whole file, kept verbatim.
            text = s.rstrip("\r\n") if fmt == "txt" else s
        if reason is None and not text:
            reason = "empty"
        if reason is None:
            res.texts.append(text)
        else:
            res.skipped[reason] += 1
            if len(res.examples) < 5:
                res.examples.append((first_line + k, reason))
    return res


@dataclass
class Document:
    text: str
    line: int


def iter_documents(path: str, json_key: str = "text") -> Iterator[Document]:
    """Valid documents of one jsonl/txt file, in order (bad lines skipped)."""
    fmt = input_format(path)
    for first, lines in iter_line_batches(path):
        res = parse_lines(lines, first, fmt, json_key)
        for t in res.texts:
            yield Document(t, first)
